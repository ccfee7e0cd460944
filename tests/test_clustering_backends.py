"""Clustering on every backend: CuPy runs the numpy kernels with the same host seed stream, so it builds
the same tree up to float rounding (gpu); cuML splits with its own seeding, so only quality is compared
(cuml). Both skip cleanly where the hardware or the package is missing."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import make_blobs

from ops.backend import cuml_available, cupy_available, resolve_backend, to_numpy
from ops.clustering import build_divisive_tree, divisive_kmeans
from ops.kmeans import kmeans
from ops.selection import select_ipc_nodes

needs_cupy = pytest.mark.skipif(not cupy_available(), reason="needs CuPy with a CUDA device")
needs_cuml = pytest.mark.skipif(not cuml_available(), reason="needs cuML (RAPIDS) with a CUDA device")

N_BLOBS = 8


@pytest.fixture(scope="module")
def blobs():
    """Well separated blobs in 256-d float32: every correct 2-means split cuts between blobs."""
    X, y = make_blobs(n_samples=1200, n_features=256, centers=N_BLOBS, cluster_std=1.0, center_box=(-20, 20),
                      random_state=3)
    return X.astype(np.float32), y


def leaf_sets(tree):
    return {tuple(leaf.members.tolist()) for leaf in tree.leaves()}


def partition_sse(X, labels):
    X = X.astype(np.float64)
    return sum(float(((X[labels == k] - X[labels == k].mean(axis=0)) ** 2).sum()) for k in np.unique(labels))


def test_numpy_tree_recovers_the_blobs(blobs):
    # The premise of the device comparisons below: on this data the partition is the blobs themselves.
    X, y = blobs
    tree = build_divisive_tree(X, N_BLOBS, seed=0)
    assert leaf_sets(tree) == {tuple(np.flatnonzero(y == k).tolist()) for k in range(N_BLOBS)}


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_split_orientation_depends_on_the_partition_only(blobs, seed):
    # The first child of every split holds the parent's lowest row: which of several equivalent starts won
    # (a float-rounding question that BLAS and cuBLAS answer differently) cannot reorder node ids.
    X, _ = blobs
    tree = build_divisive_tree(X, 2 * N_BLOBS, seed=seed)
    for node in tree.nodes:
        if node.children:
            first, second = (tree.nodes[c] for c in node.children)
            assert first.members[0] == node.members[0] < second.members[0]


@pytest.mark.gpu
@needs_cupy
@pytest.mark.parametrize("seed", [0, 1, 3])
def test_cupy_tree_equals_numpy_tree(blobs, seed):
    import cupy

    X, _ = blobs
    be = resolve_backend("cupy")
    host = build_divisive_tree(X, N_BLOBS, seed=seed, backend="numpy")
    dev = build_divisive_tree(be.asarray(X), N_BLOBS, seed=seed, backend=be)
    assert isinstance(dev.root.mean, cupy.ndarray)
    assert leaf_sets(dev) == leaf_sets(host)
    assert sum(n.sse for n in dev.leaves()) == pytest.approx(sum(n.sse for n in host.leaves()), rel=1e-4)
    # Same nodes in the same order (same seed stream, oriented splits), each with the same members.
    assert len(dev.nodes) == len(host.nodes)
    for a, b in zip(host.nodes, dev.nodes):
        assert (a.parent, a.depth, a.children) == (b.parent, b.depth, b.children)
        np.testing.assert_array_equal(a.members, b.members)
        assert b.sse == pytest.approx(a.sse, rel=1e-4)
    np.testing.assert_allclose(to_numpy(dev.root.mean), host.root.mean, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@needs_cupy
def test_cupy_divisive_kmeans_partition_and_sse(blobs):
    import cupy

    X, _ = blobs
    labels_h, centers_h = divisive_kmeans(X, N_BLOBS, seed=0)
    labels_d, centers_d = divisive_kmeans(cupy.asarray(X), N_BLOBS, seed=0, backend="cupy")
    assert isinstance(labels_d, np.ndarray) and isinstance(centers_d, cupy.ndarray)
    np.testing.assert_array_equal(labels_d, labels_h)
    assert partition_sse(X, labels_d) == pytest.approx(partition_sse(X, labels_h), rel=1e-4)
    np.testing.assert_allclose(cupy.asnumpy(centers_d), centers_h, rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
@needs_cupy
def test_cupy_kmeans_baseline_equals_numpy(blobs):
    import cupy

    X, _ = blobs
    labels_h, centers_h, sse_h = kmeans(X, N_BLOBS, seed=5)
    labels_d, centers_d, sse_d = kmeans(cupy.asarray(X), N_BLOBS, seed=5, backend="cupy")
    assert isinstance(labels_d, cupy.ndarray)
    np.testing.assert_array_equal(cupy.asnumpy(labels_d), labels_h)
    assert sse_d == pytest.approx(sse_h, rel=1e-4)


@pytest.mark.gpu
@needs_cupy
@pytest.mark.parametrize("method", ["divisive", "kmeans"])
def test_cupy_ipc_selection_equals_numpy(blobs, method):
    import cupy

    X, _ = blobs
    host = select_ipc_nodes(X, 5, method=method, seed=2)
    dev = select_ipc_nodes(cupy.asarray(X), 5, method=method, seed=2, backend="cupy")
    assert isinstance(dev.centroids, cupy.ndarray)
    np.testing.assert_array_equal(dev.node_ids, host.node_ids)
    assert [m.tolist() for m in dev.members] == [m.tolist() for m in host.members]
    np.testing.assert_allclose(cupy.asnumpy(dev.centroids), host.centroids, rtol=1e-4, atol=1e-3)


@pytest.mark.cuml
@needs_cuml
def test_cuml_tree_finds_the_blobs(blobs):
    import cupy

    X, y = blobs
    tree = build_divisive_tree(cupy.asarray(X), N_BLOBS, seed=0, backend="cuml")
    # cuML seeds itself, so the node order may differ from numpy's; the leaves are the blobs all the same.
    assert leaf_sets(tree) == {tuple(np.flatnonzero(y == k).tolist()) for k in range(N_BLOBS)}


@pytest.mark.cuml
@needs_cuml
def test_cuml_kmeans_baseline_quality(blobs):
    import cupy

    X, _ = blobs
    _, _, sse_h = kmeans(X, N_BLOBS, seed=0)
    labels, centers, sse = kmeans(cupy.asarray(X), N_BLOBS, seed=0, backend="cuml")
    assert isinstance(labels, cupy.ndarray) and centers.shape == (N_BLOBS, X.shape[1])
    assert sse == pytest.approx(sse_h, rel=1e-3)
    assert resolve_backend("cuml").kmeans == "cuml"
