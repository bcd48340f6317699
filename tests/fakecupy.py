"""fakecupy: a NumPy-backed stand-in for CuPy, as strict as CuPy where the engine could go wrong on a GPU.

`make()` returns a module object named "cupy" that tests put where the backend looks for CuPy
(`sys.modules["cupy"]`, see the `cp` fixture in tests/test_nn_cupy.py). Like CuPy:
- its arrays (`ndarray`) are not np.ndarray, so every `isinstance(a, np.ndarray)` branch takes the GPU side;
- `np.asarray(device_array)` raises TypeError (CuPy refuses implicit transfers: use `.get()` or `asnumpy`);
- a NumPy array passed to its ufuncs, functions, operators or array methods raises TypeError, and NumPy
  ufuncs and functions called on device arrays are dispatched to it (CuPy's __array_ufunc__ and
  __array_function__), so they raise too when they mix in a NumPy array;
- assigning a NumPy array into a device array raises ValueError;
- reductions and integer indexing return 0-d device arrays, never NumPy scalars;
- `copyto` refuses a Python number as its source, as CuPy 13.0-13.2 do under NumPy 2;
- `empty` / `empty_like` hand out garbage (NaN, or a bit pattern for integers), as device memory is;
- only names in CuPy's namespace (CUPY_NAMES) are offered: any other raises AttributeError, and so does
  a CuPy name this stand-in does not implement.
It keeps a ledger (`LEDGER`): each device-to-host transfer (a host sync: .get(), asnumpy, float(), int(),
bool(), .item(), boolean-mask indexing) with the line that asked for it; each ufunc input that overlaps
its `out=` without being that very object (CuPy copies such an input first); the bytes of live device
buffers. `make(broken=...)` imitates a CuPy that imports but cannot compile a kernel or load cuBLAS.

What it cannot catch is listed at the top of tests/test_nn_cupy.py.
"""
import sys
import types
import weakref

import numpy as np

# The public names of CuPy's namespace: every module-level name bound in cupy/__init__.py of the
# cupy-cuda12x 14.2.0 wheel (imports, definitions, assignments, and the `lib` subpackage it imports
# from), read with Python's ast module; underscore names left out. Regenerate from a newer wheel's
# cupy/__init__.py the same way.
CUPY_NAMES = frozenset("""
    AxisError ComplexWarning DataSource ElementwiseKernel Inf Infinity ModuleDeprecationWarning NAN NINF NZERO NaN
    PINF PZERO RankWarning RawKernel RawModule ReductionKernel TooHardError VisibleDeprecationWarning abs absolute
    acos acosh add all allclose alltrue amax amin angle any append apply_along_axis apply_over_axes arange arccos
    arccosh arcsin arcsinh arctan arctan2 arctanh argmax argmin argpartition argsort argwhere around array
    array2string array_equal array_equiv array_repr array_split array_str asanyarray asarray asarray_chkfinite
    ascontiguousarray asfarray asfortranarray asin asinh asnumpy astype atan atan2 atanh atleast_1d atleast_2d
    atleast_3d average bartlett base_repr binary_repr bincount bitwise_and bitwise_count bitwise_invert
    bitwise_left_shift bitwise_not bitwise_or bitwise_right_shift bitwise_xor blackman bool bool_ broadcast
    broadcast_arrays broadcast_shapes broadcast_to byte byte_bounds c_ can_cast cbrt cdouble ceil cfloat choose
    clear_memo clip column_stack common_type complex128 complex64 complex_ complexfloating compress concat
    concatenate conj conjugate convolve copy copysign copyto corrcoef correlate cos cosh count_nonzero cov cross
    csingle cuda cumprod cumproduct cumsum cumulative_prod cumulative_sum deg2rad degrees delete diag diag_indices
    diag_indices_from diagflat diagonal diff digitize disable_experimental_feature_warning disp divide divmod dot
    double dsplit dstack dtype e ediff1d einsum empty empty_like equal euler_gamma exceptions exp exp2 expand_dims
    expm1 extract eye fabs fft fill_diagonal find_common_type finfo fix flatiter flatnonzero flip fliplr flipud
    float16 float32 float64 float_ float_power floating floor floor_divide fmax fmin fmod format_float_positional
    format_float_scientific format_parser frexp fromDlpack from_dlpack frombuffer fromfile fromfunction fromiter
    fromstring full full_like fuse gcd generic genfromtxt get_array_module get_array_wrap get_default_memory_pool
    get_default_pinned_memory_pool get_printoptions gradient greater greater_equal half hamming hanning heaviside
    histogram histogram2d histogramdd hsplit hstack hypot i0 identity iinfo imag in1d index_exp indices inexact
    inf infty inner int16 int32 int64 int8 int_ intc integer interp intersect1d intp invert is_available isclose
    iscomplex iscomplexobj isdtype isfinite isfortran isin isinf isnan isneginf isposinf isreal isrealobj isscalar
    issctype issubclass_ issubdtype issubsctype iterable ix_ kaiser kron lcm ldexp left_shift less less_equal
    lexsort lib linalg linspace load loadtxt log log10 log1p log2 logaddexp logaddexp2 logical_and logical_not
    logical_or logical_xor logspace long longlong make_aligned_dtype mask_indices matmul matrix_transpose max
    maximum may_share_memory mean median memoize meshgrid mgrid min min_scalar_type minimum mintypecode mod modf
    moveaxis msort multiply nan nan_to_num nanargmax nanargmin nancumprod nancumsum nanmax nanmean nanmedian
    nanmin nanprod nanstd nansum nanvar ndarray ndim ndindex negative newaxis nextafter nonzero not_equal number
    obj2sctype ogrid ones ones_like outer packbits pad partition percentile permute_dims pi piecewise place poly
    poly1d polyadd polyfit polymul polynomial polysub polyval positive pow power printoptions prod product
    promote_types ptp put put_along_axis putmask quantile r_ rad2deg radians random ravel ravel_multi_index real
    real_if_close reciprocal remainder repeat require reshape resize result_type right_shift rint roll rollaxis
    roots rot90 round round_ row_stack s_ safe_eval save savetxt savez savez_compressed sctype2char searchsorted
    select set_printoptions set_string_function setdiff1d setxor1d shape shares_memory short show_config sign
    signbit signedinteger sin sinc single singlecomplex sinh size sometrue sort sort_complex split sqrt square
    squeeze stack std subtract sum swapaxes take take_along_axis tan tanh tensordot testing tile trace transpose
    trapezoid trapz tri tril tril_indices tril_indices_from trim_zeros triu triu_indices triu_indices_from
    true_divide trunc typename ubyte ufunc uint uint16 uint32 uint64 uint8 uintc uintp ulong ulonglong union1d
    unique unique_all unique_counts unique_inverse unique_values unpackbits unravel_index unsignedinteger unwrap
    ushort vander var vdot vectorize vsplit vstack where who zeros zeros_like""".split())

# The ndarray methods this stand-in offers, a subset of CuPy's: each is among the `_ndarray_base.<name>`
# method names compiled into the same wheel's cupy/_core/core*.so (read with `strings`); so are get, set,
# item, tolist, tobytes, fill, T, flags, shape and the other attributes defined below. No __index__: CuPy
# has none.
_METHODS = ("all any argmax argmin argsort astype clip conj copy cumprod cumsum diagonal dot flatten max "
            "mean min nonzero prod put ravel repeat reshape round sort squeeze std sum swapaxes take trace "
            "transpose var view").split()
# Functions that take host data and copy it to the device.
_FROM_HOST = {"asarray", "array", "asanyarray"}
_MATMUL = {"matmul", "dot", "tensordot", "inner", "outer", "einsum", "vdot"}


class Ledger:
    """What the fake saw: host syncs, overlap copies, live device buffers."""

    def __init__(self):
        self.syncs = []           # (what, "file:line")
        self.overlap_copies = []  # (ufunc, "file:line")
        self._buffers = weakref.WeakValueDictionary()

    def track(self, a):
        base = a
        while getattr(base, "base", None) is not None:
            base = base.base
        if isinstance(base, np.ndarray):
            self._buffers[id(base)] = base

    def live_bytes(self):
        """Bytes of the device buffers still referenced (by arrays, views or workspaces)."""
        return sum(b.nbytes for b in list(self._buffers.values()))

    def reset(self):
        self.syncs.clear()
        self.overlap_copies.clear()


LEDGER = Ledger()
_BROKEN = {"mode": None}


def _caller():
    """'file:line' of the first frame outside this file, NumPy and the backend's pass-through helpers."""
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename == __file__ or "/numpy/" in frame.f_code.co_filename
                                 or frame.f_code.co_filename.endswith(("pipeline/nn/backend.py",
                                                                        "pipeline/nn/threads.py"))):
        frame = frame.f_back
    if frame is None:
        return "?"
    path = frame.f_code.co_filename
    for marker in ("/pipeline/", "/tests/"):
        if marker in path:
            path = marker[1:] + path.split(marker, 1)[1]
            break
    return f"{path}:{frame.f_lineno}"


def _sync(what):
    LEDGER.syncs.append((what, _caller()))


class DeviceError(RuntimeError):
    """What a broken install raises on its first kernel (CuPy: CompileException, CUBLASError)."""


def _check_broken(name):
    mode = _BROKEN["mode"]
    if mode == "compile" and name not in _MATMUL:
        raise DeviceError("nvrtc: error: failed to open libnvrtc-builtins.so (fakecupy, broken='compile')")
    if mode == "cublas" and name in _MATMUL:
        raise DeviceError("CUBLAS_STATUS_NOT_INITIALIZED (fakecupy, broken='cublas')")


def _wrap(a, originals=None):
    """Device arrays for NumPy results: arrays wrapped, NumPy scalars as 0-d arrays, containers walked.
    `originals` maps id(numpy array) -> the device array that wrapped it, so `out=`, `copy=False` and the
    like give back the very same device object."""
    if isinstance(a, np.ndarray):
        if originals and id(a) in originals:
            return originals[id(a)]
        if a.dtype == object:
            raise TypeError("CuPy has no object arrays")
        arr = object.__new__(ndarray)
        arr._a = a
        LEDGER.track(a)
        return arr
    if isinstance(a, np.generic) and not isinstance(a, (np.str_, np.bytes_)):
        return _wrap(np.asarray(a))
    if isinstance(a, tuple):
        return tuple(_wrap(x, originals) for x in a)
    if isinstance(a, list):
        return [_wrap(x, originals) for x in a]
    return a


def _unwrap(x, originals, what):
    """NumPy views of device arrays for the NumPy call underneath; host arrays refused as CuPy does."""
    if isinstance(x, ndarray):
        originals[id(x._a)] = x
        return x._a
    if isinstance(x, np.ndarray):
        raise TypeError(f"Unsupported type {type(x)} (a NumPy array passed to cupy {what}; "
                        f"move it with cupy.asarray first)")
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v, originals, what) for v in x)
    return x


def _unwrap_key(key):
    """An index for __getitem__/__setitem__: device arrays unwrapped, host index arrays allowed (CuPy copies
    them over); a boolean device mask is a host sync (CuPy needs the count of its True values)."""
    items = key if isinstance(key, tuple) else (key,)
    out = []
    for k in items:
        if isinstance(k, ndarray):
            if k.dtype == bool and k.ndim > 0:
                _sync("boolean-mask index")
            k = k._a
        elif isinstance(k, list):
            k = np.asarray(k)
        out.append(k)
    return tuple(out) if isinstance(key, tuple) else out[0]


UFUNC_KEYWORDS = {"out", "dtype", "casting"}  # what a CuPy elementwise ufunc accepts


def _function(name, fn, elementwise):
    def call(*args, **kwargs):
        _check_broken(name)
        originals = {}
        if name in _FROM_HOST and args and isinstance(args[0], np.ndarray):
            host, rest = args[0], args[1:]
            dtype = kwargs.get("dtype", rest[0] if rest else None)
            return _wrap(np.array(host, dtype=dtype, copy=True))  # a host-to-device copy
        if elementwise and set(kwargs) - UFUNC_KEYWORDS:  # CuPy: TypeError('Wrong arguments ...')
            raise TypeError(f"cupy.{name}: CuPy's ufuncs take no {', '.join(sorted(set(kwargs) - UFUNC_KEYWORDS))} "
                            f"(only {', '.join(sorted(UFUNC_KEYWORDS))}): NumPy's where= and friends do not exist there")
        a = _unwrap(args, originals, name)
        k = {key: _unwrap(v, originals, name) for key, v in kwargs.items()}
        out = kwargs.get("out")
        if elementwise and isinstance(out, ndarray):
            for x in args:
                if isinstance(x, ndarray) and x is not out and np.may_share_memory(x._a, out._a):
                    LEDGER.overlap_copies.append((name, _caller()))
        return _wrap(fn(*a, **k), originals)

    call.__name__ = call.__qualname__ = name
    return call


class _Namespace(types.SimpleNamespace):
    pass


def _as_strided(x, shape=None, strides=None):
    if not isinstance(x, ndarray):
        raise TypeError(f"Unsupported type {type(x)}")
    return _wrap(np.lib.stride_tricks.as_strided(x._a, shape=shape, strides=strides))


def _asnumpy(a, stream=None, order="C", out=None, blocking=True):
    if isinstance(a, ndarray):
        _sync("asnumpy")
        return np.array(a._a, order=order, copy=True)
    return np.asarray(a, order=order)


class _MemoryPool:
    def used_bytes(self):
        return LEDGER.live_bytes()

    def total_bytes(self):
        return LEDGER.live_bytes()

    def free_all_blocks(self, stream=None):
        pass


class _Device:
    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)

    def synchronize(self):
        _sync("Device.synchronize")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_POOL = _MemoryPool()


def _special(module):
    """The names implemented by hand rather than by wrapping NumPy's."""
    devices = module._devices
    runtime = _Namespace(getDeviceCount=lambda: devices)
    return {
        "ndarray": ndarray,
        "asnumpy": _asnumpy,
        "get_array_module": lambda *args: module if any(isinstance(a, ndarray) for a in args) else np,
        "cuda": _Namespace(runtime=runtime, is_available=lambda: devices > 0, Device=_Device),
        "is_available": lambda: devices > 0,
        "lib": _Namespace(stride_tricks=_Namespace(as_strided=_as_strided)),
        "get_default_memory_pool": lambda: _POOL,
        "get_default_pinned_memory_pool": lambda: _POOL,
        "empty": _garbage(np.empty),
        "empty_like": _garbage(np.empty_like),
        "copyto": _copyto,
    }


def _copyto(dst, src, casting="same_kind", where=True):
    """cupy.copyto; a Python number as `src` raises TypeError, as CuPy 13.0-13.2 under NumPy 2 do (they ask
    numpy.can_cast of it, which NumPy 2 refuses for Python scalars; CuPy 13.3 fixed it): pass a NumPy scalar."""
    if type(src) in (bool, int, float, complex):  # (np.float64 is a float too, and CuPy takes it)
        raise TypeError(f"cupy.copyto: a Python {type(src).__name__} as src fails on CuPy 13.0-13.2 under NumPy 2 "
                        f"(numpy.can_cast refuses Python scalars): pass a NumPy scalar of dst's dtype")
    return _function("copyto", np.copyto, elementwise=False)(dst, src, casting=casting, where=where)


def _garbage(np_fn):
    def make_empty(*args, **kwargs):
        _check_broken("elementwise")
        originals = {}
        a = _unwrap(args, originals, np_fn.__name__)
        out = np_fn(*a, **kwargs)
        if out.dtype.kind == "f":
            out.fill(np.nan)
        elif out.dtype.kind in "iu":
            out.fill(np.iinfo(out.dtype).max // 3)
        elif out.dtype.kind == "b":  # recycled device memory: a mask read before it is written is not all False
            out.view(np.uint8).fill(0xA5)
        return _wrap(out)

    make_empty.__name__ = np_fn.__name__
    return make_empty


class FakeCupyModule(types.ModuleType):
    """The module `make()` returns: CuPy's names, resolved on first use."""

    def __getattr__(self, name):
        if name.startswith("__") or name not in CUPY_NAMES:
            raise AttributeError(f"module 'cupy' has no attribute '{name}'")
        special = _special(self)
        if name in special:
            value = special[name]
        else:
            np_obj = getattr(np, name, None)
            if np_obj is None or isinstance(np_obj, types.ModuleType):
                raise AttributeError(f"cupy.{name} exists in CuPy but fakecupy does not implement it")
            if isinstance(np_obj, np.ufunc):
                value = _function(name, np_obj, elementwise=True)
            elif callable(np_obj) and not isinstance(np_obj, type):
                value = _function(name, np_obj, elementwise=False)
            else:
                value = np_obj  # dtypes, constants
        setattr(self, name, value)
        return value


_CURRENT = {"module": None}


def make(broken=None, devices=1):
    """A fresh fake `cupy` module: broken=None | 'compile' (no element-wise kernel can be compiled) |
    'cublas' (matrix products fail); devices: what cuda.runtime.getDeviceCount() answers."""
    if broken not in (None, "compile", "cublas"):
        raise ValueError(f"unknown broken mode {broken!r}")
    module = FakeCupyModule("cupy", "fakecupy: a NumPy-backed stand-in for CuPy (tests only)")
    module._devices = int(devices)
    module._ledger = LEDGER
    module.__version__ = "0.0.0+fakecupy"
    _BROKEN["mode"] = broken
    LEDGER.reset()
    _CURRENT["module"] = module
    return module


def _ufunc(name):
    module = _CURRENT["module"]
    if module is None:
        raise RuntimeError("fakecupy.make() has not been called")
    return getattr(module, name)


def _binary(name):
    def op(self, other):
        return _ufunc(name)(self, other)

    def rop(self, other):
        return _ufunc(name)(other, self)

    def iop(self, other):
        return _ufunc(name)(self, other, out=self)

    return op, rop, iop


def _method(name):
    def method(self, *args, **kwargs):
        _check_broken("elementwise")
        originals = {id(self._a): self}
        a = _unwrap(args, originals, f"ndarray.{name}")
        k = {key: _unwrap(v, originals, f"ndarray.{name}") for key, v in kwargs.items()}
        return _wrap(getattr(self._a, name)(*a, **k), originals)

    method.__name__ = name
    return method



def _synced(what, convert):
    """A method that copies the array to the host (a sync, recorded) and converts it with convert(array, ...)."""
    def method(self, *args):
        _sync(what)
        return convert(self._a, *args)

    method.__name__ = what
    return method

class ndarray:
    """A device array: a NumPy array inside, reachable only the ways CuPy allows."""

    __slots__ = ("_a", "__weakref__")
    __array_priority__ = 100.0

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        self._a = np.empty(shape, dtype=dtype, order=order)
        LEDGER.track(self._a)

    # -- attributes -------------------------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: _wrap(self._a.T))
    base = property(lambda self: None if self._a.base is None else _wrap(self._a.base))

    # -- transfers: each one a host sync ------------------------------------------------------------
    def get(self, stream=None, order="C", out=None, blocking=True):
        _sync("get")
        if out is not None:
            out[...] = self._a
            return out
        return np.array(self._a, order=order, copy=True)

    def set(self, arr, stream=None):
        if not isinstance(arr, np.ndarray):
            raise TypeError("set() takes a NumPy array")
        self._a[...] = arr

    item = _synced("item", lambda a: a.item())
    tolist = _synced("tolist", lambda a: a.tolist())
    tobytes = _synced("tobytes", lambda a, order="C": a.tobytes(order))
    __float__ = _synced("float", float)
    __int__ = _synced("int", int)
    __complex__ = _synced("complex", complex)
    __bool__ = _synced("bool", bool)

    def __format__(self, spec):
        _sync("format")
        return format(self._a.item() if self._a.ndim == 0 else self._a, spec)

    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    # -- NumPy's entry points dispatch here, as CuPy's do -------------------------------------------
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if method != "__call__" or ufunc.__name__ not in CUPY_NAMES:
            return NotImplemented
        return _ufunc(ufunc.__name__)(*inputs, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        if func.__name__ not in CUPY_NAMES:
            return NotImplemented
        try:
            fn = _ufunc(func.__name__)
        except AttributeError:
            return NotImplemented
        return fn(*args, **kwargs)

    # -- indexing ---------------------------------------------------------------------------------
    def __getitem__(self, key):
        return _wrap(self._a[_unwrap_key(key)])

    def __setitem__(self, key, value):
        if isinstance(value, np.ndarray):
            raise ValueError("Unsupported: assigning a NumPy array into a cupy array; move it with cupy.asarray "
                             "first")
        _check_broken("elementwise")
        if isinstance(value, ndarray):
            value = value._a
        elif isinstance(value, (list, tuple)):
            raise ValueError("Unsupported: assigning a Python sequence into a cupy array")
        self._a[_unwrap_key(key)] = value

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        if self._a.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(len(self._a)))

    def __repr__(self):
        return f"fakecupy.ndarray(shape={self._a.shape}, dtype={self._a.dtype})"

    __str__ = __repr__

    def __copy__(self):
        return self.copy()

    def __deepcopy__(self, memo):
        return self.copy()

    def fill(self, value):
        if isinstance(value, np.ndarray):
            raise TypeError(f"Unsupported type {type(value)}")
        self._a.fill(value)

    # -- operators through the ufuncs -------------------------------------------------------------
    __add__, __radd__, __iadd__ = _binary("add")
    __sub__, __rsub__, __isub__ = _binary("subtract")
    __mul__, __rmul__, __imul__ = _binary("multiply")
    __truediv__, __rtruediv__, __itruediv__ = _binary("true_divide")
    __floordiv__, __rfloordiv__, __ifloordiv__ = _binary("floor_divide")
    __mod__, __rmod__, __imod__ = _binary("remainder")
    __pow__, __rpow__, __ipow__ = _binary("power")
    __matmul__, __rmatmul__, __imatmul__ = _binary("matmul")
    __and__, __rand__, __iand__ = _binary("bitwise_and")
    __or__, __ror__, __ior__ = _binary("bitwise_or")
    __xor__, __rxor__, __ixor__ = _binary("bitwise_xor")
    __lshift__, __rlshift__, __ilshift__ = _binary("left_shift")
    __rshift__, __rrshift__, __irshift__ = _binary("right_shift")
    __eq__ = _binary("equal")[0]
    __ne__ = _binary("not_equal")[0]
    __lt__ = _binary("less")[0]
    __le__ = _binary("less_equal")[0]
    __gt__ = _binary("greater")[0]
    __ge__ = _binary("greater_equal")[0]
    __hash__ = None

    def __neg__(self):
        return _ufunc("negative")(self)

    def __pos__(self):
        return _ufunc("positive")(self)

    def __abs__(self):
        return _ufunc("absolute")(self)

    def __invert__(self):
        return _ufunc("invert")(self)


for _name in _METHODS:
    setattr(ndarray, _name, _method(_name))
ndarray.__module__ = "cupy"
del _name


def install(monkeypatch, broken=None, devices=1):
    """Make the backend find a fresh fake as `cupy` (its import, the device check and the probe all run
    as they would against CuPy); monkeypatch undoes it. Returns the fake module."""
    from pipeline.nn import backend, threads

    fake = make(broken=broken, devices=devices)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    for name, value in (("_cupy", None), ("_cupy_tried", False), ("_cupy_usable", None)):
        if hasattr(backend, name):
            monkeypatch.setattr(backend, name, value)
    # the engine's per-thread scratch buffers would outlive the fake holding its arrays, which NumPy code
    # could then be lent (once the fake is gone, the backend takes them for NumPy's): its own while it lasts
    monkeypatch.setattr(threads._local, "scratch", {}, raising=False)
    return fake
