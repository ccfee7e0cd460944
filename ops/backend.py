"""Array-module selection: numpy on CPU, CuPy when the data already lives on a GPU.

Nothing optional is imported at module import time; CuPy and cuML are looked up lazily and only
when an array is not a numpy array (or when the caller asks whether a GPU is usable).
"""
from __future__ import annotations

import functools
import importlib.util

import numpy as np


def array_module(x):
    """Return the module (numpy or cupy) that owns array ``x``."""
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return np
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy  # noqa: PLC0415 - lazy on purpose

        return cupy
    return np


def is_gpu_array(x) -> bool:
    return array_module(x) is not np


@functools.cache
def cupy_available() -> bool:
    """True when CuPy imports *and* a CUDA device can be used."""
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy  # noqa: PLC0415

        return bool(cupy.cuda.is_available())
    except Exception:  # a broken CUDA install must read as "no GPU", never crash
        return False


@functools.cache
def cuml_available() -> bool:
    if not cupy_available() or importlib.util.find_spec("cuml") is None:
        return False
    try:
        import cuml  # noqa: F401, PLC0415

        return True
    except Exception:
        return False


def to_numpy(x) -> np.ndarray:
    """Copy ``x`` to host memory (no-op for numpy arrays)."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "get"):  # cupy
        return x.get()
    if hasattr(x, "detach"):  # torch
        return x.detach().cpu().numpy()
    return np.asarray(x)


def check_finite_matrix(x, name: str, ndim: int = 2):
    """Validate rank and finiteness; raise ValueError naming ``name``."""
    xp = array_module(x)
    if getattr(x, "ndim", None) != ndim:
        raise ValueError(f"{name} must be a {ndim}-D array, got shape {getattr(x, 'shape', None)}")
    if not bool(xp.all(xp.isfinite(x))):
        raise ValueError(f"{name} contains NaN or inf")
    return x
