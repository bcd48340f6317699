"""Scratch memory: one flat buffer lent out as arrays of any shape, kept between training steps.

A fresh 10-100 MB array each step costs page faults comparable to the copy that fills it. A layer owns
Workspaces; a split gives each of its threads its own (`for_thread(t)`), and memory that must outlive the
threads' scratch, such as the columns a forward keeps for its backward, has a named slot (`slot(name)`).
"""
import numpy as np

from pipeline.nn.backend import get_array_module


class Workspace:
    """Each `array()` call reuses the same memory, so an array stays valid only until the next call."""

    def __init__(self):
        self._flat = None
        self._threads = {}  # part index -> Workspace
        self._slots = {}    # name -> Workspace

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
        """The workspace of the engine's thread t (0: the calling thread, this one): threads never share memory."""
        if not isinstance(t, int):
            raise TypeError(f"for_thread takes a thread's part index, got {t!r} (named memory: slot)")
        if t == 0:
            return self
        if t not in self._threads:
            self._threads[t] = Workspace()
        return self._threads[t]

    def slot(self, name):
        """A workspace of its own for the memory named `name` ("kept": the columns a forward keeps), apart
        from every thread's."""
        if not isinstance(name, str):
            raise TypeError(f"slots are named, got {name!r}")
        if name not in self._slots:
            self._slots[name] = Workspace()
        return self._slots[name]
