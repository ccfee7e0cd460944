"""A stand-in for CuPy that runs on numpy and counts device-to-host transfers (a test helper).

``ops.backend.array_module`` picks CuPy for any array whose type lives in a module named ``cupy...`` and then
imports ``cupy``. Installing this module as ``sys.modules["cupy"]`` (``install(monkeypatch)``) therefore
sends ``ops`` down its GPU code path on a CPU machine, with numpy doing the arithmetic, so results can be
compared bit for bit with the numpy path and every host round trip is counted.

Counted as a device-to-host transfer (each one a synchronisation on a real GPU): ``get()`` (what
``ops.backend.to_numpy`` calls), ``float()``, ``int()``, ``bool()``, ``operator.index()``, ``item()``,
``tolist()``, indexing with a boolean device mask (CuPy must read back how many rows it selects), and the
functions whose output size depends on the data (``nonzero``, ``flatnonzero``, ``argwhere``, ``unique``).
Like CuPy, implicit conversion to numpy (``np.asarray(device_array)``) is an error, so a hidden transfer
fails loudly instead of going uncounted.
"""
from __future__ import annotations

import collections
import traceback
import types

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

SIZE_DEPENDENT = ("nonzero", "flatnonzero", "argwhere", "unique")


class ImplicitTransferError(RuntimeError):
    """np.asarray (or the like) of a device array: CuPy refuses it too."""


class Counter:
    """Transfers by kind; ``where`` keeps the calling line of each (for a readable failure)."""

    def __init__(self):
        self.by_kind = collections.Counter()
        self.where = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def add(self, kind: str) -> None:
        self.by_kind[kind] += 1
        frames = [f for f in traceback.extract_stack()[:-2] if "counting_cupy" not in f.filename]
        if frames:
            f = frames[-1]
            self.where[f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {kind}"] += 1

    def reset(self) -> None:
        self.by_kind.clear()
        self.where.clear()


COUNTER = Counter()


def _unwrap(x):
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v) for k, v in x.items()}
    return x


def _wrap(x):
    if isinstance(x, np.ndarray):
        return ndarray(x)
    if isinstance(x, np.generic):  # CuPy reductions return 0-d device arrays, not host scalars
        return ndarray(np.asarray(x))
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


def _is_device_mask(key) -> bool:
    keys = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, ndarray) and k._a.dtype == np.bool_ for k in keys)


class ndarray(NDArrayOperatorsMixin):
    """A numpy array that behaves as if it lived on a device."""

    __array_priority__ = 100

    def __init__(self, a):
        self._a = a

    # -- shape and friends: metadata, no transfer
    shape = property(lambda self: self._a.shape)
    ndim = property(lambda self: self._a.ndim)
    dtype = property(lambda self: self._a.dtype)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    T = property(lambda self: ndarray(self._a.T))

    def __len__(self):
        return len(self._a)

    def __repr__(self):
        return f"counting_cupy.ndarray(shape={self.shape}, dtype={self.dtype})"

    # -- device-to-host transfers
    def get(self):
        COUNTER.add("get")
        return self._a.copy()

    def __float__(self):
        COUNTER.add("float")
        return float(self._a)

    def __int__(self):
        COUNTER.add("int")
        return int(self._a)

    def __bool__(self):
        COUNTER.add("bool")
        return bool(self._a)

    def __index__(self):
        COUNTER.add("index")
        return self._a.__index__()

    def item(self):
        COUNTER.add("item")
        return self._a.item()

    def tolist(self):
        COUNTER.add("tolist")
        return self._a.tolist()

    def __array__(self, dtype=None, copy=None):
        # CuPy raises TypeError here; numpy would then fall back to reading the array element by element
        raise ImplicitTransferError("implicit conversion to a numpy array is not allowed (counting_cupy: use .get())")

    # -- indexing
    def __getitem__(self, key):
        if _is_device_mask(key):
            COUNTER.add("mask")
        return _wrap(self._a[_unwrap(key)])

    def __setitem__(self, key, value):
        self._a[_unwrap(key)] = _unwrap(value)

    def __iter__(self):
        return (ndarray(np.asarray(row)) for row in self._a)

    # -- arithmetic and numpy functions, computed by numpy, results stay "on the device"
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        out = kwargs.get("out")
        kwargs = _unwrap(kwargs)
        result = getattr(ufunc, method)(*_unwrap(inputs), **kwargs)
        return out[0] if out else _wrap(result)

    def __array_function__(self, func, types_, args, kwargs):
        if func.__name__ in SIZE_DEPENDENT:
            COUNTER.add(func.__name__)
        return _wrap(func(*_unwrap(args), **_unwrap(kwargs)))

    def __getattr__(self, name):
        if name.startswith("__"):  # no __array_interface__ and the like: numpy must not read the buffer
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if not callable(attr):
            return _wrap(attr)

        def method(*args, **kwargs):
            return _wrap(attr(*_unwrap(args), **_unwrap(kwargs)))

        return method


def _namespace(source, name: str) -> types.ModuleType:
    module = types.ModuleType(name)

    def __getattr__(attr):
        value = getattr(source, attr)
        if isinstance(value, types.ModuleType):
            return _namespace(value, f"{name}.{attr}")
        if isinstance(value, type) or not callable(value):
            return value  # dtypes (float32, ...) and constants
        if attr in SIZE_DEPENDENT:
            def counted(*args, **kwargs):
                COUNTER.add(attr)
                return _wrap(value(*_unwrap(args), **_unwrap(kwargs)))
            return counted

        def function(*args, **kwargs):
            return _wrap(value(*_unwrap(args), **_unwrap(kwargs)))

        return function

    module.__getattr__ = __getattr__
    return module


def make_module() -> types.ModuleType:
    """A fresh ``cupy`` stand-in: numpy's namespace, arrays wrapped as ``ndarray``."""
    module = _namespace(np, "cupy")
    module.ndarray = ndarray
    module.__version__ = "counting-0"
    module.COUNTER = COUNTER

    def asarray(x, dtype=None):
        return ndarray(np.array(_unwrap(x), dtype=dtype, copy=True)) if not isinstance(x, ndarray) or dtype else x

    module.asarray = asarray
    module.array = lambda x, dtype=None: ndarray(np.array(_unwrap(x), dtype=dtype, copy=True))
    return module


ndarray.__module__ = "cupy._counting"  # what ops.backend.array_module looks at


def install(monkeypatch) -> types.ModuleType:
    """Make ``import cupy`` return the counting stand-in for the rest of the test."""
    import sys

    module = make_module()
    monkeypatch.setitem(sys.modules, "cupy", module)
    COUNTER.reset()
    return module
