"""Stage 2 on a GPU pays a synchronisation for every value it reads back to the host. The divisive tree's
kernels batch what each step needs into one transfer; these tests count the transfers per IPC-50 class with
a stand-in for CuPy that runs on numpy (tests/counting_cupy.py: ``ops`` takes its GPU code path, numpy does
the arithmetic) and check that the trees are the same, bit for bit, as those of the implementation before
the batching (tests/frozen_clustering), on both code paths."""
from __future__ import annotations

import struct

import counting_cupy
import numpy as np
import pytest
from frozen_clustering import selection as frozen_selection

from ops import selection as ops_selection


def latent_class(n: int, d: int, modes: int = 30, seed: int = 0) -> np.ndarray:
    """A class-of-latents stand-in (a Gaussian mixture whose modes have a low-rank spread of their own)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((modes, d), dtype=np.float32) * 0.6
    label = rng.integers(0, modes, n)
    X = rng.standard_normal((n, d), dtype=np.float32) * 0.8
    for m in range(modes):
        rows = np.flatnonzero(label == m)
        factor = rng.standard_normal((8, d), dtype=np.float32) * 0.5
        X[rows] += centres[m] + rng.standard_normal((rows.size, 8), dtype=np.float32) @ factor
    return X


def tree_bytes(selection) -> list:
    """Everything the selection and its tree hold, as exact values (floats by their bits)."""
    def exact(x):
        x = x.get() if hasattr(x, "get") else x
        return np.asarray(x).tobytes()

    tree = selection.tree  # None for the k-means baseline
    nodes = [(n.id, n.parent, n.depth, n.children, n.members.tobytes(), exact(n.mean), struct.pack("<d", n.sse))
             for n in (tree.nodes if tree else [])]
    return [nodes, sorted(tree.unsplittable) if tree else [], exact(selection.centroids), selection.node_ids.tobytes(),
            selection.levels.tobytes(), selection.picked_by, [m.tobytes() for m in selection.members]]


def run_both(X, ipc, monkeypatch, **kwargs):
    """(frozen, current) selections on the numpy path and on the counted GPU path, and the transfer counts."""
    out = {"numpy": [frozen_selection.select_ipc_nodes(X, ipc, **kwargs),
                     ops_selection.select_ipc_nodes(X, ipc, **kwargs)]}
    fake = counting_cupy.install(monkeypatch)
    counts = []
    for select in (frozen_selection.select_ipc_nodes, ops_selection.select_ipc_nodes):
        Xd = fake.asarray(X)
        counting_cupy.COUNTER.reset()
        out.setdefault("device", []).append(select(Xd, ipc, **kwargs))
        counts.append(counting_cupy.COUNTER.total)
    return out, counts


def test_ipc50_class_needs_5x_fewer_transfers_and_builds_the_same_tree(monkeypatch):
    X = latent_class(1300, 128, seed=1)
    out, (before, after) = run_both(X, 50, monkeypatch, seed=0)
    for path, (frozen, current) in out.items():
        assert tree_bytes(current) == tree_bytes(frozen), path
        assert current.tree.n_leaves == 100
    # the stand-in's GPU path really took the device branches (its counts are what a GPU would pay)
    assert type(out["device"][1].centroids).__module__.startswith("cupy")
    print(f"device-to-host transfers per IPC-50 class: {before} before, {after} now ({before / after:.1f}x)")
    assert after * 5 <= before, counting_cupy.COUNTER.where.most_common(10)
    splits = len(out["device"][1].tree.nodes) // 2
    assert after <= 5 * splits  # a handful per split: draws, exploration, one per Lloyd step of the winner


def test_ipc50_kmeans_baseline_reads_counts_and_shift_together(monkeypatch):
    X = latent_class(1300, 128, seed=1)
    out, (before, after) = run_both(X, 50, monkeypatch, seed=0, method="kmeans")
    for path, (frozen, current) in out.items():
        assert tree_bytes(current) == tree_bytes(frozen), path
    print(f"k-means baseline, transfers per IPC-50 class: {before} before, {after} now")
    assert after < before


@pytest.mark.parametrize("case", ["duplicates", "few_distinct", "float64", "small_n_init", "medoid", "kmeans"])
def test_edge_cases_build_the_same_tree_on_both_paths(case, monkeypatch):
    rng = np.random.default_rng(7)
    kwargs = {"seed": 3}
    if case == "duplicates":  # identical rows: unsplittable nodes, starts whose sides empty
        X = np.repeat(rng.standard_normal((9, 16), dtype=np.float32), 20, axis=0)
        X[:5] += rng.standard_normal((5, 16), dtype=np.float32) * 1e-3
        ipc = 8
    elif case == "few_distinct":  # fewer distinct points than ipc: repeats
        X = np.repeat(rng.standard_normal((3, 8), dtype=np.float32), 4, axis=0)
        ipc = 5
    elif case == "float64":
        X = latent_class(300, 32, modes=6, seed=2).astype(np.float64)
        ipc = 10
    elif case == "small_n_init":
        X = latent_class(400, 48, modes=8, seed=3)
        ipc, kwargs["n_init"] = 12, 1
    elif case == "medoid":
        X = latent_class(200, 24, modes=5, seed=4)
        ipc, kwargs["centroid"] = 6, "medoid"
    elif case == "kmeans":  # MGD3's baseline: one read per Lloyd step (counts and shift together)
        X = latent_class(300, 32, modes=6, seed=5)
        ipc, kwargs["method"] = 10, "kmeans"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # too few points is warned about, on purpose here
        out, (before, after) = run_both(X, ipc, monkeypatch, **kwargs)
    for path, (frozen, current) in out.items():
        assert tree_bytes(current) == tree_bytes(frozen), path
    assert after <= before


def test_kmeans_with_emptied_clusters_is_unchanged(monkeypatch):
    """More centres than distinct rows: k-means++ repeats a row, the twin centre empties in Lloyd and is
    re-seeded with the farthest point (the path with a second host read)."""
    from frozen_clustering import kmeans as frozen_kmeans

    from ops import kmeans as ops_kmeans

    rng = np.random.default_rng(11)
    X = np.repeat(rng.standard_normal((5, 6), dtype=np.float32), 7, axis=0)
    X[::7] += rng.standard_normal((5, 6), dtype=np.float32) * 0.01
    emptied = []
    update = ops_kmeans._update

    def watched(Xc, labels, d2, centers):
        emptied.append(bool((np.bincount(np.asarray(labels.get() if hasattr(labels, "get") else labels),
                                         minlength=centers.shape[0]) == 0).any()))
        return update(Xc, labels, d2, centers)

    monkeypatch.setattr(ops_kmeans, "_update", watched)

    def exact(result):
        labels, centers, sse = result
        host = [a.get() if hasattr(a, "get") else a for a in (labels, centers)]
        return [host[0].tobytes(), host[1].tobytes(), struct.pack("<d", sse)]

    assert exact(ops_kmeans.kmeans(X, 8, seed=2)) == exact(frozen_kmeans.kmeans(X, 8, seed=2))
    fake = counting_cupy.install(monkeypatch)
    assert exact(ops_kmeans.kmeans(fake.asarray(X), 8, seed=2)) == exact(frozen_kmeans.kmeans(fake.asarray(X), 8, seed=2))
    assert any(emptied)


def test_counting_stand_in_counts_what_a_gpu_would_wait_for(monkeypatch):
    fake = counting_cupy.install(monkeypatch)
    a = fake.asarray(np.arange(6, dtype=np.float32))
    total = (a * 2).sum()  # stays on the "device"
    assert counting_cupy.COUNTER.total == 0 and type(total).__module__.startswith("cupy")
    float(total), int(a[1]), bool(a[0]), a[a > 2], a.get()
    assert dict(counting_cupy.COUNTER.by_kind) == {"float": 1, "int": 1, "bool": 1, "mask": 1, "get": 1}
    with pytest.raises(counting_cupy.ImplicitTransferError):
        np.asarray(a)  # an implicit transfer fails instead of going uncounted
