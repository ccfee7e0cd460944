"""ops.backend: the documented `auto` rule, explicit choices, clear errors, lazy imports.

CPU tests stand in for a GPU by patching the availability checks (and a stub `cupy` module where the
rule has to reach for the namespace); the gpu-marked test runs the real thing."""
from __future__ import annotations

import subprocess
import sys
import types

import numpy as np
import pytest

import ops.backend as backend
from ops.backend import (
    BackendUnavailableError,
    ClusterBackend,
    backend_for_array,
    cupy_available,
    resolve_backend,
)

needs_cupy = pytest.mark.skipif(not cupy_available(), reason="needs CuPy with a CUDA device")


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(backend, "cupy_problem", lambda: "CuPy 14.2.0 is installed but no CUDA device is usable")
    monkeypatch.setattr(backend, "cuml_problem", lambda: "cuML needs CuPy with a CUDA device")


@pytest.fixture
def fake_gpu(monkeypatch):
    """CuPy 'usable' and cuML 'installed', with a stub cupy namespace."""
    stub = types.ModuleType("cupy")
    stub.__version__ = "14.2.0"
    stub.asarray = lambda x: ("on-device", x)
    monkeypatch.setitem(sys.modules, "cupy", stub)
    monkeypatch.setattr(backend, "cupy_problem", lambda: "")
    monkeypatch.setattr(backend, "cuml_problem", lambda: "")
    return stub


def test_numpy_backend():
    be = resolve_backend("numpy")
    assert (be.name, be.requested, be.xp, be.kmeans, be.on_gpu) == ("numpy", "numpy", np, "ops", False)
    x = np.ones((3, 2), np.float32)
    assert be.asarray(x) is x
    assert be.describe() == {"requested": "numpy", "backend": "numpy", "kmeans": "ops"}


def test_auto_without_a_gpu_is_numpy(no_gpu):
    be = resolve_backend("auto")
    assert (be.name, be.requested, be.xp) == ("numpy", "auto", np)


def test_auto_with_a_gpu_is_cupy_never_cuml(fake_gpu):
    be = resolve_backend("auto")
    assert (be.name, be.requested, be.xp, be.kmeans) == ("cupy", "auto", fake_gpu, "ops")
    assert be.asarray(np.zeros(2))[0] == "on-device"
    assert resolve_backend("cuml").kmeans == "cuml"  # only when asked for by name


@pytest.mark.parametrize("name,needle", [("cupy", "no CUDA device"), ("cuml", "cuML")])
def test_explicit_gpu_backend_without_a_gpu_says_why(no_gpu, name, needle):
    with pytest.raises(BackendUnavailableError, match=needle):
        resolve_backend(name)


def test_cuml_without_cuml_says_why(monkeypatch, fake_gpu):
    monkeypatch.setattr(backend, "cuml_problem", lambda: "cuML is not installed (pip install 'manifoldgd[rapids]')")
    assert resolve_backend("cupy").name == "cupy"
    with pytest.raises(BackendUnavailableError, match="not installed"):
        resolve_backend("cuml")


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("torch")
    with pytest.raises(ValueError, match="backend"):
        backend_for_array(np.zeros((2, 2)), "gpu")


def test_array_level_choice_follows_the_data():
    x = np.zeros((4, 2))
    assert backend_for_array(x) == "numpy"
    assert backend_for_array(x, resolve_backend("numpy")) == "numpy"
    for name in ("cupy", "cuml"):
        with pytest.raises(ValueError, match="resolve_backend"):
            backend_for_array(x, name)


def test_real_environment_is_consistent():
    # Whatever this machine has, `auto` obeys the rule and the reason string agrees with it.
    be = resolve_backend("auto")
    assert be.name == ("cupy" if cupy_available() else "numpy")
    assert isinstance(be, ClusterBackend)
    assert (backend.cupy_problem() == "") == cupy_available()


def test_numpy_backend_imports_nothing_optional():
    code = ("import sys, numpy as np; from ops.backend import resolve_backend; from ops.selection import "
            "select_ipc_nodes; be = resolve_backend('numpy'); select_ipc_nodes(be.asarray(np.eye(6)), 2, "
            "backend=be.name); print(sorted(m for m in ('cupy', 'cuml') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.gpu
@needs_cupy
def test_auto_on_a_gpu_machine_puts_data_on_the_device():
    import cupy

    be = resolve_backend("auto")
    assert be.name == "cupy" and be.xp is cupy
    x = be.asarray(np.arange(6, dtype=np.float32).reshape(3, 2))
    assert isinstance(x, cupy.ndarray)
    assert backend_for_array(x) == "cupy"
    assert be.describe()["cupy"] == cupy.__version__
