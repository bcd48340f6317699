"""A CuPy that imports and sees a GPU but fails on its first real operation, as a CuPy built for another CUDA
driver or GPU architecture does. Put tests/broken_cupy on sys.path (PYTHONPATH) to get it as `cupy`."""


class CUDARuntimeError(RuntimeError):
    pass


class ndarray:  # isinstance checks work; no array is ever made
    pass


class _Runtime:
    @staticmethod
    def getDeviceCount():
        return 1


class cuda:
    runtime = _Runtime


def _fail(*args, **kwargs):
    raise CUDARuntimeError("cudaErrorNoKernelImageForDevice: no kernel image is available for execution on the "
                           "device")


def __getattr__(name):  # every array function and dtype: fails when called
    return _fail
