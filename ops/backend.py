"""Array-module and clustering-backend selection.

Two levels:
- ``resolve_backend(name)`` is the *configuration* choice (``cluster.backend: auto | numpy | cupy | cuml``):
  it says where a class's latents should live and which k-means runs on them, before any data is
  touched. The caller moves the data with ``ClusterBackend.asarray`` and passes ``backend.name`` on.
- ``array_module(x)`` / ``backend_for_array(x, name)`` are the *array-level* view used inside ``ops``:
  the code follows the data (numpy arrays run on the host, CuPy arrays on their GPU).

Nothing optional is imported at module import time; CuPy and cuML are imported lazily, only when a
CuPy array is seen or a GPU backend is asked for, and behind checks that turn a missing or broken
install into a clear error (or into "numpy" for ``auto``).

Supported CuPy: 13.x and 14.x (``ops`` uses no ``ndarray.mT``, no ``searchsorted`` with a Python scalar,
and no ``kind=`` for CuPy sorts, which are always stable).
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from types import ModuleType

import numpy as np

BACKENDS = ("auto", "numpy", "cupy", "cuml")


class BackendUnavailableError(RuntimeError):
    """A GPU backend was asked for explicitly but cannot run here (message says why)."""


def array_module(x):
    """Return the module (numpy or cupy) that owns array ``x`` (numpy for anything that is not CuPy)."""
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return np
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy  # noqa: PLC0415 - lazy on purpose

        return cupy
    return np


def is_gpu_array(x) -> bool:
    return array_module(x) is not np


@functools.cache
def cupy_problem() -> str:
    """Empty when CuPy imports *and* a CUDA device can be used; otherwise why not (one line).

    Cached: whether a CUDA device exists does not change within a process.
    """
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed (pip install 'manifoldgd[gpu]' for CUDA 13, '[gpu-cuda12]' for CUDA 12)"
    try:
        import cupy  # noqa: PLC0415

        if not cupy.cuda.is_available():
            return f"CuPy {cupy.__version__} is installed but no CUDA device is usable"
    except Exception as err:  # a broken CUDA install must read as "no GPU", never crash
        return f"CuPy does not import cleanly: {type(err).__name__}: {err}"
    return ""


def cupy_available() -> bool:
    """True when CuPy imports *and* a CUDA device can be used."""
    return not cupy_problem()


@functools.cache
def cuml_problem() -> str:
    """Empty when cuML imports and has a GPU to run on; otherwise why not (one line)."""
    if cupy_problem():
        return f"cuML needs CuPy with a CUDA device: {cupy_problem()}"
    if importlib.util.find_spec("cuml") is None:
        return ("cuML is not installed (pip install 'manifoldgd[rapids]' for CUDA 13, "
                "'manifoldgd[rapids-cuda12]' for CUDA 12)")
    try:
        import cuml  # noqa: F401, PLC0415
    except Exception as err:
        return f"cuML does not import cleanly: {type(err).__name__}: {err}"
    return ""


def cuml_available() -> bool:
    return not cuml_problem()


@dataclass(frozen=True)
class ClusterBackend:
    """What stage 2 needs to know about the chosen backend.

    name: the resolved backend, "numpy", "cupy" or "cuml" (never "auto"); pass it as ``backend=`` to
    ``ops.clustering`` / ``ops.kmeans``. requested: what the config asked for (record both).
    xp: the array namespace the data must live in (numpy for "numpy", cupy for "cupy" and "cuml").
    kmeans: which k-means does the 2-means splits and the MGD3 baseline: "ops" (this project's kernel,
    host-seeded, identical draws on numpy and CuPy) or "cuml" (cuML's KMeans with its own seeding).
    """

    name: str
    requested: str
    xp: ModuleType
    kmeans: str

    @property
    def on_gpu(self) -> bool:
        return self.name != "numpy"

    def asarray(self, x):
        """``x`` in this backend's namespace: a host array is copied to the current GPU for cupy/cuml."""
        return x if self.xp is np and isinstance(x, np.ndarray) else self.xp.asarray(x)

    def describe(self) -> dict:
        """Plain values for run.json / the manifest."""
        out = {"requested": self.requested, "backend": self.name, "kmeans": self.kmeans}
        if self.on_gpu:
            out["cupy"] = self.xp.__version__
        if self.name == "cuml":
            import cuml  # noqa: PLC0415

            out["cuml"] = cuml.__version__
        return out


def resolve_backend(name: str = "auto") -> ClusterBackend:
    """The clustering backend for ``cluster.backend`` = ``name``.

    - ``numpy``: host arrays, this project's k-means kernels.
    - ``cupy``: CuPy arrays on the current GPU, the *same* kernels with the same initialisation rule and
      the same host ``numpy.random.Generator`` draws, so a CPU worker and a GPU worker build the same
      divisive tree up to float rounding.
    - ``cuml``: CuPy arrays, cuML's KMeans for the 2-means splits and the k = IPC baseline (cuML's own
      seeding: a different, equally valid tree from the numpy/cupy one for the same seed).
    - ``auto``: ``cupy`` when CuPy imports and a CUDA device is usable, ``numpy`` otherwise. It never picks
      ``cuml`` (that would change the algorithm's seeding behind the user's back).

    Asking for ``cupy`` or ``cuml`` where it cannot run raises BackendUnavailableError saying why;
    an unknown name raises ValueError.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    resolved = name
    if name == "auto":
        resolved = "cupy" if cupy_available() else "numpy"
    elif name == "cupy" and cupy_problem():
        raise BackendUnavailableError(f"backend 'cupy' cannot run here: {cupy_problem()}")
    elif name == "cuml" and cuml_problem():
        raise BackendUnavailableError(f"backend 'cuml' cannot run here: {cuml_problem()}")
    if resolved == "numpy":
        return ClusterBackend("numpy", name, np, "ops")
    import cupy  # noqa: PLC0415

    return ClusterBackend(resolved, name, cupy, "cuml" if resolved == "cuml" else "ops")


def backend_for_array(x, backend="auto") -> str:
    """The kernel family to run on array ``x``: "numpy", "cupy" or "cuml".

    ``backend`` is a name from BACKENDS or a ClusterBackend. "auto" follows the data: numpy arrays run
    the host kernels, CuPy arrays the same kernels on the GPU; it never picks cuML. Asking for a backend
    that does not match where ``x`` lives is a ValueError: move the data first with
    ``resolve_backend(name).asarray(x)``.
    """
    if isinstance(backend, ClusterBackend):
        backend = backend.name
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_gpu = is_gpu_array(x)
    if backend == "auto":
        return "cupy" if on_gpu else "numpy"
    if backend == "numpy" and on_gpu:
        raise ValueError("backend='numpy' needs host data; this array is a CuPy array (use .get())")
    if backend in ("cupy", "cuml") and not on_gpu:
        raise ValueError(f"backend={backend!r} needs a CuPy array; move the data with "
                         f"resolve_backend({backend!r}).asarray(x)")
    if backend == "cuml" and cuml_problem():
        raise BackendUnavailableError(f"backend 'cuml' cannot run here: {cuml_problem()}")
    return backend


def to_numpy(x) -> np.ndarray:
    """Copy ``x`` to host memory (no-op for numpy arrays); an explicit transfer, never implicit."""
    if isinstance(x, np.ndarray):
        return x
    if type(x).__module__.split(".")[0] == "cupy":
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
