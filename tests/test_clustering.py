"""ops.clustering: divisive tree, leaf partition, level-wise IPC selection, small-class policy, bad input.

Quality is judged against scikit-learn's BisectingKMeans on Gaussian blobs and on real data
(sklearn.datasets.load_digits: 1,797 real 8x8 handwritten digits that ship with scikit-learn).
"""
from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
from sklearn.cluster import BisectingKMeans, KMeans
from sklearn.datasets import load_digits, make_blobs
from threadpoolctl import threadpool_limits

from ops.backend import cupy_available
from ops.clustering import TooFewPointsWarning, build_divisive_tree, divisive_kmeans
from ops.kmeans import choose_backend
from ops.selection import default_start_level, select_ipc_centroids, select_ipc_nodes


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    # The CI box has 2 cores shared with other jobs; multi-threaded BLAS/OpenMP then spins and a
    # 0.1 s fit can take 10 s. One thread keeps every test here at a second or less.
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return d.data.astype(np.float32), d.target


def partition_sse(X, labels) -> float:
    X = X.astype(np.float64)
    return float(sum(((X[labels == k] - X[labels == k].mean(axis=0)) ** 2).sum() for k in np.unique(labels)))


# --- the tree ------------------------------------------------------------------------------------------

def test_same_seed_same_tree_and_other_seed_runs(digits):
    X, _ = digits
    a, b = build_divisive_tree(X, 25, seed=3), build_divisive_tree(X, 25, seed=3)
    assert [n.members.tolist() for n in a.nodes] == [n.members.tolist() for n in b.nodes]
    assert all(np.array_equal(p.mean, q.mean) and p.sse == q.sse for p, q in zip(a.nodes, b.nodes))
    la, ca = divisive_kmeans(X, 25, seed=3)
    lb, cb = divisive_kmeans(X, 25, seed=3)
    assert np.array_equal(la, lb) and np.array_equal(ca, cb)


def test_tree_invariants(digits):
    X, _ = digits
    tree = build_divisive_tree(X, 30, seed=0)
    assert tree.n_leaves == 30
    X64 = X.astype(np.float64)
    for node in tree.nodes:
        rows = X64[node.members]
        np.testing.assert_allclose(node.mean, rows.mean(axis=0), rtol=1e-5, atol=1e-4)
        assert node.sse == pytest.approx(((rows - rows.mean(axis=0)) ** 2).sum(), rel=1e-5)
        if node.children:
            left, right = (tree.nodes[c] for c in node.children)
            assert left.depth == right.depth == node.depth + 1 and left.parent == right.parent == node.id
            both = np.concatenate([left.members, right.members])
            assert np.array_equal(np.sort(both), node.members) and len(set(both.tolist())) == both.size
            assert left.sse + right.sse <= node.sse * (1 + 1e-9)
    # Leaves partition the points.
    labels = tree.leaf_labels()
    assert labels.min() == 0 and set(labels.tolist()) == set(range(30))


def test_always_splits_the_largest_sse_leaf(digits):
    X, _ = digits
    tree = build_divisive_tree(X, 20, seed=1)
    # Replay the growth: at each split, the split node had the largest SSE among the leaves of that time.
    leaves = {0}
    splits = sorted((n for n in tree.nodes if n.children), key=lambda n: n.children[0])  # ids = creation order
    assert len(splits) == 19
    for node in splits:
        if node.children:
            assert node.sse == max(tree.nodes[i].sse for i in leaves)
            leaves.remove(node.id)
            leaves.update(node.children)


def test_bigger_tree_extends_smaller_one(digits):
    X, _ = digits
    small, big = build_divisive_tree(X, 10, seed=5), build_divisive_tree(X, 20, seed=5)
    for p, q in zip(small.nodes, big.nodes):
        assert p.id == q.id and np.array_equal(p.members, q.members)


def test_planted_clusters_recovered_exactly():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 50, size=(6, 32))
    sizes = [40, 90, 15, 60, 120, 33]
    X = np.concatenate([c + rng.normal(0, 1, size=(s, 32)) for c, s in zip(centres, sizes)]).astype(np.float32)
    truth = np.repeat(np.arange(6), sizes)
    for labels in (divisive_kmeans(X, 6, seed=0)[0], divisive_kmeans(X, 6, seed=1)[0]):
        # Each leaf is exactly one planted cluster.
        pairs = set(zip(labels.tolist(), truth.tolist()))
        assert len(pairs) == 6 and len({p[0] for p in pairs}) == 6
    sel = select_ipc_nodes(X, 6, method="kmeans", seed=0)
    assert sorted(m.size for m in sel.members) == sorted(sizes)


def _sse_ratio(X, n_leaves, seeds=range(5)):
    ours = [partition_sse(X, divisive_kmeans(X, n_leaves, seed=s)[0]) for s in seeds]
    ref = [partition_sse(X, BisectingKMeans(n_leaves, bisecting_strategy="biggest_inertia",
                                            random_state=s).fit(X).labels_) for s in seeds]
    return np.mean(ours) / np.mean(ref), max(o / r for o, r in zip(ours, ref))


def test_sse_matches_sklearn_on_gaussian_blobs():
    X = make_blobs(1500, 32, centers=12, cluster_std=2.0, random_state=0)[0].astype(np.float32)
    mean_ratio, worst = _sse_ratio(X, 20)
    assert mean_ratio <= 1.02 and worst <= 1.05


@pytest.mark.parametrize("n_leaves", [10, 30])
def test_sse_matches_sklearn_on_real_digits(digits, n_leaves):
    X, _ = digits
    # Both are greedy heuristics, so single runs differ by a few percent either way: compare the mean
    # over five seeds, and bound the worst single run.
    mean_ratio, worst = _sse_ratio(X, n_leaves)
    assert mean_ratio <= 1.02 and worst <= 1.05


def test_duplicates_stop_the_tree_early():
    X = np.repeat(np.eye(3, dtype=np.float32), [4, 5, 6], axis=0)
    tree = build_divisive_tree(X, 10)
    assert tree.n_leaves == 3 and all(leaf.sse == 0.0 for leaf in tree.leaves())
    with pytest.warns(TooFewPointsWarning):
        labels, centers = divisive_kmeans(X, 10)
    assert centers.shape == (3, 3) and len(set(labels.tolist())) == 3


# --- IPC selection ----------------------------------------------------------------------------------------

def _class(digits, digit=3):
    X, y = digits
    return X[y == digit]


def test_start_level_changes_the_selected_set(digits):
    X = _class(digits)
    sets = {s: frozenset(select_ipc_nodes(X, 10, start_level=s).node_ids.tolist()) for s in (0, 1, 2, 3, 4)}
    assert len(set(sets.values())) == len(sets), sets
    a, b = select_ipc_centroids(X, 10, start_level=0), select_ipc_centroids(X, 10, start_level=3)
    assert not np.allclose(np.sort(a, axis=0), np.sort(b, axis=0))


def test_branching_one_makes_start_level_a_no_op(digits):
    # The public code's tree has exactly ipc leaves: every start level picks the same set.
    X = _class(digits)
    sets = {frozenset(select_ipc_nodes(X, 10, start_level=s, branching=1).node_ids.tolist()) for s in range(5)}
    assert len(sets) == 1


@pytest.mark.parametrize("ipc,start_level", [(10, None), (10, 2), (10, 6), (5, 1), (20, 3), (1, None)])
def test_selected_nodes_are_never_nested(digits, ipc, start_level):
    X = _class(digits, 7)
    sel = select_ipc_nodes(X, ipc, start_level=start_level)
    assert sel.centroids.shape == (ipc, X.shape[1]) and not sel.repeated and sel.n_unique == ipc
    ids = sel.node_ids.tolist()
    assert len(set(ids)) == ipc
    for i in ids:
        for j in ids:
            if i != j:
                assert not sel.tree.is_nested(i, j)
    members = np.concatenate(sel.members)
    assert len(set(members.tolist())) == members.size  # disjoint
    for node_id, level, centre in zip(ids, sel.levels, sel.centroids):
        assert sel.tree.nodes[node_id].depth == level
        np.testing.assert_array_equal(centre, sel.tree.nodes[node_id].mean)


def test_level_scan_takes_coarse_nodes_then_leaves(digits):
    X = _class(digits)
    sel = select_ipc_nodes(X, 10)  # default start level
    assert sel.start_level == default_start_level(10) == 4
    n_level = sel.picked_by.count("level")
    assert n_level >= 1 and sel.picked_by == ["level"] * n_level + ["leaf"] * (10 - n_level)
    assert list(sel.levels[:n_level]) == sorted(sel.levels[:n_level], reverse=True)  # deep -> shallow
    assert all(sel.tree.nodes[i].is_leaf for i in sel.node_ids[n_level:])


@pytest.mark.parametrize("start_level", [2, 3, None])
def test_level_picks_follow_the_documented_rule(digits, start_level):
    # Replay the rule: at each level, the pick has the most members among the nodes of that depth that
    # are not nested with an earlier pick and leave enough free leaves to still reach ipc.
    X = _class(digits, 5)
    ipc = 8
    sel = select_ipc_nodes(X, ipc, start_level=start_level)
    tree = sel.tree

    def leaves_below(i):
        node = tree.nodes[i]
        return 1 if node.is_leaf else sum(leaves_below(c) for c in node.children)

    taken = []
    for node_id, how in zip(sel.node_ids, sel.picked_by):
        if how != "level":
            break
        depth = tree.nodes[node_id].depth
        spare = tree.n_leaves - ipc - sum(leaves_below(t) - 1 for t in taken)
        rivals = [n for n in tree.nodes if n.depth == depth and leaves_below(n.id) - 1 <= spare
                  and not any(tree.is_nested(n.id, t) for t in taken)]
        assert tree.nodes[node_id].size == max(n.size for n in rivals)
        taken.append(node_id)
    assert taken, "the scan took no node"
    fill = [tree.nodes[i].size for i, how in zip(sel.node_ids, sel.picked_by) if how == "leaf"]
    assert fill == sorted(fill, reverse=True)  # leaves: most members first


def test_ipc_one_is_the_class_mean(digits):
    X = _class(digits)
    np.testing.assert_allclose(select_ipc_centroids(X, 1)[0], X.mean(axis=0), rtol=1e-5, atol=1e-4)


def test_medoid_is_a_real_member(digits):
    X = _class(digits)
    sel = select_ipc_nodes(X, 8, centroid="medoid")
    for centre, members in zip(sel.centroids, sel.members):
        assert any(np.array_equal(centre, X[i]) for i in members)


def test_kmeans_baseline_matches_sklearn_quality(digits):
    X = _class(digits)
    ours = []
    for seed in range(3):
        sel = select_ipc_nodes(X, 10, method="kmeans", seed=seed)
        labels = np.full(len(X), -1)
        for k, members in enumerate(sel.members):
            labels[members] = k
        assert labels.min() == 0  # the clusters cover the class
        ours.append(partition_sse(X, labels))
    ref = [KMeans(10, n_init=3, random_state=s).fit(X).inertia_ for s in range(3)]
    assert np.mean(ours) <= 1.02 * np.mean(ref)
    a = select_ipc_centroids(X, 10, method="kmeans", seed=4)
    assert np.array_equal(a, select_ipc_centroids(X, 10, method="kmeans", seed=4))


# --- small classes: warning + flag + ipc rows ------------------------------------------------------------

@pytest.mark.parametrize("method", ["divisive", "kmeans"])
def test_zero_points_is_an_error(method):
    with pytest.raises(ValueError, match="X"):
        select_ipc_centroids(np.zeros((0, 8), np.float32), 4, method=method)


@pytest.mark.parametrize("method", ["divisive", "kmeans"])
@pytest.mark.parametrize("case", ["one", "ipc-1", "identical"])
def test_too_few_distinct_points_repeat_with_warning(method, case):
    rng = np.random.default_rng(0)
    ipc = 6
    X = {"one": rng.normal(size=(1, 5)),
         "ipc-1": rng.normal(size=(ipc - 1, 5)),
         "identical": np.repeat(rng.normal(size=(1, 5)), 30, axis=0)}[case].astype(np.float32)
    distinct = np.unique(X, axis=0)
    with pytest.warns(TooFewPointsWarning):
        sel = select_ipc_nodes(X, ipc, method=method)
    assert sel.repeated and sel.n_unique == len(distinct)
    assert sel.centroids.shape == (ipc, 5)
    # What exists is returned once each, then repeated in the same order.
    first = sel.centroids[: sel.n_unique]
    assert np.allclose(np.sort(first, axis=0), np.sort(distinct, axis=0), atol=1e-6)
    for i in range(ipc):
        np.testing.assert_array_equal(sel.centroids[i], first[i % sel.n_unique])
    assert sel.picked_by[sel.n_unique:] == ["repeat"] * (ipc - sel.n_unique)


def test_enough_points_do_not_warn(digits):
    X = _class(digits)[:12]
    with warnings.catch_warnings():
        warnings.simplefilter("error", TooFewPointsWarning)
        sel = select_ipc_nodes(X, 10)
    assert not sel.repeated


# --- bad input -------------------------------------------------------------------------------------------

GOOD = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)


@pytest.mark.parametrize("call,name", [
    (lambda: select_ipc_centroids(np.where(np.eye(20, 4) > 0, np.nan, GOOD), 3), "X"),
    (lambda: select_ipc_centroids(np.where(np.eye(20, 4) > 0, np.inf, GOOD), 3), "X"),
    (lambda: select_ipc_centroids(GOOD[0], 3), "X"),
    (lambda: select_ipc_centroids(GOOD[None], 3), "X"),
    (lambda: select_ipc_centroids(GOOD, 0), "ipc"),
    (lambda: select_ipc_centroids(GOOD, -2), "ipc"),
    (lambda: select_ipc_centroids(GOOD, 2.5), "ipc"),
    (lambda: select_ipc_centroids(GOOD, 3, start_level=-1), "start_level"),
    (lambda: select_ipc_centroids(GOOD, 3, branching=0), "branching"),
    (lambda: select_ipc_centroids(GOOD, 3, method="agglomerative"), "method"),
    (lambda: select_ipc_centroids(GOOD, 3, centroid="median"), "centroid"),
    (lambda: divisive_kmeans(GOOD, 21), "n_leaves"),
    (lambda: divisive_kmeans(GOOD, 0), "n_leaves"),
    (lambda: divisive_kmeans(np.full((5, 2), np.nan), 2), "X"),
    (lambda: build_divisive_tree(GOOD, 30), "max_leaves"),
    (lambda: build_divisive_tree(GOOD, 3, seed=-1), "seed"),
    (lambda: select_ipc_centroids(GOOD, 3, method="kmeans", seed=-1), "seed"),
    (lambda: build_divisive_tree(GOOD, 3, n_init=0), "n_init"),
    (lambda: build_divisive_tree(GOOD, 3, backend="cupy"), "backend"),
])
def test_bad_input_names_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        call()


# --- backends ------------------------------------------------------------------------------------------

def test_host_data_uses_numpy_and_nothing_optional_is_imported():
    assert choose_backend(GOOD) == "numpy"
    code = ("import sys, numpy as np, ops.selection as c; c.select_ipc_centroids(np.eye(6, dtype='f4'), 2);"
            "print(sorted(m for m in ('cupy', 'cuml') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.gpu
@pytest.mark.skipif(not cupy_available(), reason="needs CuPy with a CUDA device")
def test_cupy_path_matches_numpy(digits):
    import cupy

    X = _class(digits)
    host = select_ipc_nodes(X, 10, backend="auto")
    dev = select_ipc_nodes(cupy.asarray(X), 10, backend="cupy")
    assert isinstance(dev.centroids, cupy.ndarray)
    # Float sums differ in the last bits between BLAS and cuBLAS; the partition should not.
    assert {tuple(m.tolist()) for m in dev.members} == {tuple(m.tolist()) for m in host.members}
    np.testing.assert_allclose(cupy.asnumpy(dev.centroids), host.centroids, rtol=1e-4, atol=1e-3)
