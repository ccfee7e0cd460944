"""cuML stops where this project's k-means kernels stop.

The kernels stop a Lloyd run when the squared centre shift (summed over the centres) is at most tol x the
mean per-feature variance of the whole data set; cuML hands ``tol`` to its C++ loop unscaled and stops when
the shift is strictly below it. ``ops.kmeans`` translates: ``tol_from_variance`` scales, ``cuml_tol`` turns
"<" into "<=". The translation is tested here on the CPU, with a stand-in for cuML that records what it is
given; the last test (marked ``cuml``) checks it against the real cuML on a GPU."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest

import ops.clustering as clustering
import ops.kmeans as km
from ops.backend import cuml_available
from ops.kmeans import DEFAULT_TOL, cuml_tol, tol_from_variance


def _data(seed=0, n=300, d=16):
    rng = np.random.default_rng(seed)
    X = np.concatenate([rng.normal(0, 1, (n // 3, d)), rng.normal(3, 2, (n // 3, d)), rng.normal(-4, 0.5, (n - 2 * (n // 3), d))])
    return X.astype(np.float32)


def lloyd_iterations(X, C, stop) -> int:
    """Lloyd steps from centres C until ``stop(shift)`` (shift: squared centre shift summed over centres)."""
    X = X.astype(np.float64)
    C = C.astype(np.float64).copy()
    for it in range(1, 1000):
        labels = ((X[:, None, :] - C[None]) ** 2).sum(-1).argmin(1)
        new = np.stack([X[labels == j].mean(0) if (labels == j).any() else C[j] for j in range(len(C))])
        shift = float(((new - C) ** 2).sum())
        C = new
        if stop(shift):
            return it
    return 1000


def shifts(X, C, n=12) -> list[float]:
    out = []
    lloyd_iterations(X, C, lambda s: out.append(s) or len(out) >= n)
    return out


def test_tol_from_variance_is_the_kernels_scaling():
    X = _data()
    t = tol_from_variance(X, DEFAULT_TOL)
    Xc = X.astype(np.float64) - X.astype(np.float64).mean(0)
    assert t == pytest.approx(DEFAULT_TOL * float((Xc * Xc).sum()) / X.size, rel=1e-9)  # kmeans(): tol * sq.sum()/(n d)
    assert t == pytest.approx(DEFAULT_TOL * float(np.var(X.astype(np.float64), axis=0).mean()), rel=1e-9)  # sklearn
    assert tol_from_variance(3 * X, DEFAULT_TOL) == pytest.approx(9 * t, rel=1e-6)  # scales with the data
    assert tol_from_variance(X + 100, DEFAULT_TOL) == pytest.approx(t, rel=1e-4)    # not with where it sits


def test_cuml_tol_turns_strictly_below_into_at_most():
    for t in (0.0, 1e-12, 3.7e-3, 1.0, 12345.678):
        c = cuml_tol(t)
        for s in (0.0, t, np.nextafter(t, np.inf), np.nextafter(t, -np.inf), t / 2, 2 * t + 1e-300):
            s = max(float(s), 0.0)
            assert (s < c) == (s <= t), (t, s, c)
    assert cuml_tol(-1.0) == cuml_tol(0.0) > 0.0
    # tol 0: a zero shift (no label changed) stops, as in the kernels; the smallest float32 shift does not
    assert 0.0 < cuml_tol(0.0) <= float(np.nextafter(np.float32(0), np.float32(1)))


def test_translated_tol_stops_cumls_rule_at_the_kernels_iteration():
    X = _data(1)
    C0 = X[[0, 150, 299]]
    observed = shifts(X, C0)
    assert len(observed) >= 3 and observed[1] > 0
    for tol_abs in (tol_from_variance(X, DEFAULT_TOL), observed[1], 0.0):
        kernels = lloyd_iterations(X, C0, lambda s, t=tol_abs: s <= t)
        cuml = lloyd_iterations(X, C0, lambda s, t=cuml_tol(tol_abs): s < t)
        assert cuml == kernels, tol_abs
    # untranslated, the boundary case runs a step longer (and an unscaled tol stops elsewhere entirely)
    assert lloyd_iterations(X, C0, lambda s: s < observed[1]) > lloyd_iterations(X, C0, lambda s: s <= observed[1])


class _FakeKMeans:
    """Records its arguments; fits something plausible with numpy."""

    calls: list[dict] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        _FakeKMeans.calls.append(kwargs)

    def fit(self, X):
        X = np.asarray(X, dtype=np.float64)
        k = self.kwargs["n_clusters"]
        if k == 2:
            centred = X - X.mean(0)
            direction = np.linalg.svd(centred, full_matrices=False)[2][0]
            self.labels_ = (centred @ direction > 0).astype(np.int32)
        else:
            self.labels_ = (np.arange(len(X)) % k).astype(np.int32)
        self.cluster_centers_ = np.stack([X[self.labels_ == j].mean(0) for j in range(k)]).astype(np.float32)
        return self


@pytest.fixture
def fake_cuml(monkeypatch):
    cuml = types.ModuleType("cuml")
    cluster = types.ModuleType("cuml.cluster")
    cluster.KMeans = _FakeKMeans
    cuml.cluster = cluster
    monkeypatch.setitem(sys.modules, "cuml", cuml)
    monkeypatch.setitem(sys.modules, "cuml.cluster", cluster)
    monkeypatch.setattr(clustering, "choose_backend", lambda X, backend="auto": "cuml")
    monkeypatch.setattr(km, "choose_backend", lambda X, backend="auto": "cuml")
    _FakeKMeans.calls = []
    return _FakeKMeans


def test_the_tree_hands_cuml_the_whole_datas_scaled_tol_at_every_split(fake_cuml):
    X = _data(2)
    tree = clustering.build_divisive_tree(X, 6, seed=0, tol=DEFAULT_TOL, backend="cuml")
    assert len(tree.leaves()) == 6 and len(fake_cuml.calls) == 5
    want = cuml_tol(tol_from_variance(X, DEFAULT_TOL))
    for call in fake_cuml.calls:  # the whole data's variance at every node, as the kernels use it
        assert call["tol"] == pytest.approx(want, rel=1e-6) and call["n_clusters"] == 2
    fake_cuml.calls.clear()
    clustering.build_divisive_tree(3 * X, 6, seed=0, tol=DEFAULT_TOL, backend="cuml")
    assert fake_cuml.calls[0]["tol"] == pytest.approx(9 * want, rel=1e-5)


def test_the_kmeans_baseline_hands_cuml_the_scaled_tol(fake_cuml):
    X = _data(3)
    labels, centers, sse = km.kmeans(X, 4, seed=0, tol=1e-3, backend="cuml")
    assert labels.shape == (X.shape[0],) and centers.shape == (4, X.shape[1]) and sse > 0
    (call,) = fake_cuml.calls
    assert call["tol"] == pytest.approx(cuml_tol(tol_from_variance(X, 1e-3)), rel=1e-9)
    assert call["tol"] != 1e-3


@pytest.mark.cuml
@pytest.mark.skipif(not cuml_available(), reason="needs cuML (RAPIDS) with a CUDA device")
def test_real_cuml_stops_at_the_kernels_iteration():
    import cupy
    from cuml.cluster import KMeans

    X = _data(4, n=3000, d=32)
    C0 = X[[0, 1000, 2999]]
    for tol_abs in (tol_from_variance(X, DEFAULT_TOL), tol_from_variance(X, 1e-2)):
        kernels = lloyd_iterations(X, C0, lambda s, t=tol_abs: s <= t)
        model = KMeans(n_clusters=3, init=cupy.asarray(C0), n_init=1, max_iter=300, tol=cuml_tol(tol_abs),
                       output_type="cupy").fit(cupy.asarray(X))
        assert int(model.n_iter_) == kernels, (tol_abs, int(model.n_iter_), kernels)


def test_each_extra_brings_one_cupy_for_one_cuda():
    """cuML and CuPy of the same CUDA major in one extra, never two CuPy builds (cuml-cu13 itself depends on
    cupy-cuda13x, cuml-cu12 on cupy-cuda12x), and the CUDA 13 extras agree with the locked GPU CuPy."""
    import re
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def names(reqs):
        return [re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in reqs]

    majors = {"cupy-cuda13x": 13, "cupy-cuda12x": 12, "cuml-cu13": 13, "cuml-cu12": 12}
    assert "cuml-cu13" in names(extras["rapids"]) and "cupy-cuda13x" in names(extras["rapids"])
    for extra, reqs in extras.items():
        pkgs = names(reqs)
        cupys = [p for p in pkgs if p.startswith("cupy")]
        cumls = [p for p in pkgs if p.startswith("cuml")]
        assert len(cupys) <= 1, (extra, cupys)
        if cumls:
            assert cupys and {majors[p] for p in cupys + cumls} == {majors[cupys[0]]}, (extra, pkgs)
    locked = [line.split("==")[0].strip().lower() for line in (root / "requirements" / "lock-gpu.txt").read_text().splitlines()
              if line.strip() and not line.lstrip().startswith(("#", "-"))]
    assert "cupy-cuda13x" in locked and "cupy-cuda12x" not in locked
