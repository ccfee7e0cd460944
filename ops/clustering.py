"""Hierarchical divisive k-means (docs/method.md section 2); the IPC selection on its trees is ``ops.selection``.

``build_divisive_tree`` grows a binary tree by always bisecting the leaf with the largest SSE with a seeded
2-means (``ops.kmeans``); ``divisive_kmeans`` is its leaf partition.

Arrays: numpy in, numpy out on CPU; CuPy arrays stay on the GPU (centroids, node means). Member index
arrays are always host numpy arrays, so they can be written into a manifest as they are. Which kernels
run is the ``backend`` argument (see ``ops.backend``: the config-level choice is ``resolve_backend``).
"""
from __future__ import annotations

import heapq
import warnings
from dataclasses import dataclass, field

import numpy as np

from ops.backend import array_module, check_finite_matrix
from ops.kmeans import DEFAULT_TOL, all_rows_equal, choose_backend, finish_split, read_back, two_means, two_means_cuml


class TooFewPointsWarning(UserWarning):
    """A class has fewer distinct points than requested centroids; centroids were repeated."""


@dataclass
class TreeNode:
    id: int
    parent: int            # -1 for the root
    depth: int             # root = 0
    members: np.ndarray    # sorted row indices into X (host int64)
    mean: object           # (D,) array on X's device
    sse: float             # sum of squared distances of the members to ``mean``
    children: tuple = ()   # ids; empty for a leaf

    @property
    def size(self) -> int:
        return int(self.members.size)

    @property
    def is_leaf(self) -> bool:
        return not self.children


@dataclass
class DivisiveTree:
    nodes: list            # TreeNode, nodes[i].id == i, ids in creation (split) order
    n_points: int
    seed: int
    unsplittable: set = field(default_factory=set)  # leaf ids that 2-means could not split

    @property
    def root(self) -> TreeNode:
        return self.nodes[0]

    def leaves(self) -> list:
        return [n for n in self.nodes if n.is_leaf]

    @property
    def n_leaves(self) -> int:
        return sum(1 for n in self.nodes if n.is_leaf)

    @property
    def max_depth(self) -> int:
        return max(n.depth for n in self.nodes)

    def ancestors(self, node_id: int) -> list:
        out, p = [], self.nodes[node_id].parent
        while p >= 0:
            out.append(p)
            p = self.nodes[p].parent
        return out

    def is_nested(self, a: int, b: int) -> bool:
        """True when a == b or one of them is an ancestor of the other."""
        return a == b or a in self.ancestors(b) or b in self.ancestors(a)

    def leaf_labels(self) -> np.ndarray:
        """(n_points,) leaf index per point; leaves numbered in node-id order."""
        labels = np.full(self.n_points, -1, dtype=np.int64)
        for i, leaf in enumerate(self.leaves()):
            labels[leaf.members] = i
        return labels


def validate_points(X, name: str = "X"):
    if not hasattr(X, "ndim"):  # lists and the like
        X = np.asarray(X)
    check_finite_matrix(X, name)
    if X.shape[0] == 0:
        raise ValueError(f"{name} has no points (0 rows)")
    if X.shape[1] == 0:
        raise ValueError(f"{name} has no features (0 columns)")
    xp = array_module(X)
    if X.dtype not in (xp.float32, xp.float64):
        X = X.astype(xp.float64)
    return X


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def as_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _auto_n_init(n: int, d: int) -> int:
    # Starts run side by side for two Lloyd steps before the best one continues. On small nodes that
    # is nearly free; on big ones each start costs ~5 passes over the node, so fewer starts there
    # (measured: with 8/3/2 the 1,300 x 4,096 benchmark takes about half of scikit-learn's time at 1.6% lower SSE).
    if n * d <= 1_000_000:
        return 8
    return 3 if n * d <= 8_000_000 else 2


def build_divisive_tree(X, max_leaves: int, *, seed: int = 0, n_init: int | None = None,
                        tol: float = DEFAULT_TOL, backend: str = "auto") -> DivisiveTree:
    """Divisive (bisecting) k-means tree of the rows of ``X``.

    Start from one root holding every point; repeatedly bisect the leaf with the largest SSE (ties: the
    lower node id) by the best of ``n_init`` seeded k-means++ 2-means runs, until the tree has
    ``max_leaves`` leaves or no leaf can be split (fewer than 2 points, or identical points). Node ids are
    given in creation order, so the first splits of a bigger tree are exactly those of a smaller one
    grown with the same seed; each split draws from its own generator seeded by (seed, node id).
    ``n_init=None`` picks 8 starts on nodes up to 1e6 values, 3 up to 8e6, 2 above. ``tol`` is relative to the mean per-feature
    variance of the whole of X, as in scikit-learn.

    ``backend`` (a name or an ``ops.backend.ClusterBackend``): "auto" follows X (numpy -> "numpy", CuPy ->
    "cupy"); "numpy" and "cupy" run the same 2-means with the same host-drawn seeds, so they build the same
    tree up to float rounding; "cuml" splits with cuML's KMeans (its own seeding, a different tree). Node
    means stay on X's device; member indices are host arrays.
    """
    X = validate_points(X)
    max_leaves = positive_int(max_leaves, "max_leaves")
    if max_leaves > X.shape[0]:
        raise ValueError(f"max_leaves={max_leaves} exceeds the number of points in X ({X.shape[0]})")
    if n_init is not None:
        n_init = positive_int(n_init, "n_init")
    seed = as_seed(seed)
    backend = choose_backend(X, backend)
    xp = array_module(X)

    n = X.shape[0]
    # Work on X minus its mean, as scikit-learn does: |x|^2 - 2 x.c + |c|^2 stays accurate in float32.
    offset = X.mean(axis=0)
    Xg = X - offset
    sq = xp.einsum("ij,ij->i", Xg, Xg).astype(xp.float64)
    workspace = np.empty_like(Xg) if xp is np else None
    root_sum = Xg.sum(axis=0, dtype=xp.float64)
    # |x|^2 of every row also on the host (one transfer with the root's |sum|^2): node SSEs are sums of it
    host = read_back([sq, (root_sum * root_sum).sum()])
    sq_host, root_sum_sq = host[:n], float(host[n])
    root_sse = max(float(sq_host.sum()) - root_sum_sq / n, 0.0)
    tol_abs = tol * root_sse / (n * X.shape[1])
    tree = DivisiveTree(nodes=[TreeNode(0, -1, 0, np.arange(n), (offset + root_sum / n).astype(X.dtype),
                                        root_sse)], n_points=n, seed=int(seed))
    sums = {0: root_sum}  # float64 member sums in the centred frame, needed while a node is a leaf
    heap = [(-root_sse, 0)]
    n_leaves = 1
    while n_leaves < max_leaves and heap:
        _, node_id = heapq.heappop(heap)
        node = tree.nodes[node_id]
        split = None
        if node.size >= 2:
            split = _bisect(Xg, sq, sq_host, sums.pop(node_id), node, workspace, int(seed), n_init, tol_abs,
                            backend)
        if split is None:
            tree.unsplittable.add(node_id)
            continue
        ids = []
        for members, node_sum, sse in split:
            mean = (offset + node_sum / members.size).astype(X.dtype)
            child = TreeNode(len(tree.nodes), node_id, node.depth + 1, members, mean, sse)
            tree.nodes.append(child)
            sums[child.id] = node_sum
            ids.append(child.id)
            heapq.heappush(heap, (-sse, child.id))
        node.children = tuple(ids)
        n_leaves += 1
    return tree


def _rows(Xg, members: np.ndarray, workspace):
    """The node's rows as one contiguous array.

    On the host they are gathered into a reused ``workspace``: a fresh 20-160 MB array per split spends
    more time in page faults than in the copy, and ``mode="clip"`` skips the bounds-check buffering that
    otherwise makes ``take(out=...)`` slower than plain indexing.
    """
    if members.size == Xg.shape[0]:
        return Xg  # the root: already contiguous, in order
    if workspace is not None:
        return np.take(Xg, members, axis=0, out=workspace[: members.size], mode="clip")
    xp = array_module(Xg)
    return Xg[xp.asarray(members)]


def _bisect(Xg, sq_all, sq_host, node_sum, node: TreeNode, workspace, seed: int, n_init, tol_abs: float,
            backend: str):
    """Split one node; returns [(members, member sum, sse)] x 2, or None when it cannot be split.

    Device-to-host transfers: those of ``two_means`` (see there), nothing else; the SSEs of the children
    are sums of the host copy of |x|^2."""
    xp = array_module(Xg)
    Xn = _rows(Xg, node.members, workspace)
    whole = Xn is Xg
    sq = sq_all if whole else sq_all[node.members if xp is np else xp.asarray(node.members)]
    sq_node = sq_host if whole else sq_host[node.members]
    n = Xn.shape[0]
    k = n_init or _auto_n_init(*Xn.shape)
    node_seed = np.random.SeedSequence([seed, node.id])
    if backend == "cuml":
        if all_rows_equal(Xn):
            node.sse = 0.0
            return None
        labels = two_means_cuml(Xn, int(node_seed.generate_state(1)[0]), n_init=k, tol_abs=tol_abs)
        if labels is None:
            return None
        labels, s1, s0, norms = finish_split(Xn, labels, node_sum)
        host = read_back([norms, labels])
        norms, labels_host = host[:2], host[2:] > 0.5
    else:
        split = two_means(Xn, sq, sq_node, node_sum, np.random.default_rng(node_seed), n_init=k, tol_abs=tol_abs)
        if split is None:
            return None
        if split.identical:
            node.sse = 0.0  # the SSE formula leaves float dust; identical points have none
            return None
        labels_host, s1, s0, norms = split.labels_host, split.s1, split.s0, split.norms
    # Child statistics: the sums come with the split (one matrix-vector product), the SSEs from |x|^2.
    n1 = int(labels_host.sum())
    n0 = n - n1
    sse1 = float(sq_node[labels_host].sum()) - float(norms[0]) / n1
    sse0 = float(sq_node[~labels_host].sum()) - float(norms[1]) / n0
    return [(node.members[~labels_host], s0, max(sse0, 0.0)), (node.members[labels_host], s1, max(sse1, 0.0))]


def divisive_kmeans(X, n_leaves: int, *, seed: int = 0, n_init: int | None = None, backend: str = "auto"):
    """Leaf partition of the divisive tree: (labels (N,) int64 host array, centers (L, D)).

    Like scikit-learn's ``BisectingKMeans(bisecting_strategy="biggest_inertia")``. When X has fewer
    distinct rows than ``n_leaves`` the tree stops early: L < n_leaves, with a TooFewPointsWarning.
    """
    X = validate_points(X)
    n_leaves = positive_int(n_leaves, "n_leaves")
    if n_leaves > X.shape[0]:
        raise ValueError(f"n_leaves={n_leaves} exceeds the number of points in X ({X.shape[0]})")
    tree = build_divisive_tree(X, n_leaves, seed=seed, n_init=n_init, backend=backend)
    leaves = tree.leaves()
    if len(leaves) < n_leaves:
        warnings.warn(f"only {len(leaves)} distinct groups in X; returning {len(leaves)} leaves, "
                      f"not n_leaves={n_leaves}", TooFewPointsWarning, stacklevel=2)
    xp = array_module(X)
    return tree.leaf_labels(), xp.stack([leaf.mean for leaf in leaves])
