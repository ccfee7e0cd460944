"""Hierarchical divisive k-means and the multi-scale IPC centroid selection (METHOD.md section 2).

``build_divisive_tree`` grows a binary tree by always bisecting the leaf with the largest SSE with a seeded
2-means (``ops.kmeans``); ``divisive_kmeans`` is its leaf partition; ``select_ipc_nodes`` picks ``ipc``
nodes of a tree grown past ``ipc`` leaves by the level-wise rule documented on that function and in
docs/clustering.md; ``select_ipc_centroids`` returns just their centroids.

Arrays: numpy in, numpy out on CPU; CuPy arrays stay on the GPU (centroids, node means). Member index
arrays are always host numpy arrays, so they can be written into a manifest as they are. Which kernels
run is the ``backend`` argument (see ``ops.backend``: the config-level choice is ``resolve_backend``).
"""
from __future__ import annotations

import heapq
import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from ops.backend import array_module, check_finite_matrix, to_numpy
from ops.kmeans import DEFAULT_TOL, choose_backend, kmeans, two_means, two_means_cuml


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


def _validate_points(X, name: str = "X"):
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


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _seed(seed) -> int:
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
    X = _validate_points(X)
    max_leaves = _positive_int(max_leaves, "max_leaves")
    if max_leaves > X.shape[0]:
        raise ValueError(f"max_leaves={max_leaves} exceeds the number of points in X ({X.shape[0]})")
    if n_init is not None:
        n_init = _positive_int(n_init, "n_init")
    seed = _seed(seed)
    backend = choose_backend(X, backend)
    xp = array_module(X)

    n = X.shape[0]
    # Work on X minus its mean, as scikit-learn does: |x|^2 - 2 x.c + |c|^2 stays accurate in float32.
    offset = X.mean(axis=0)
    Xg = X - offset
    sq = xp.einsum("ij,ij->i", Xg, Xg).astype(xp.float64)
    workspace = np.empty_like(Xg) if xp is np else None
    root_sum = Xg.sum(axis=0, dtype=xp.float64)
    root_sse = max(float(sq.sum()) - float((root_sum * root_sum).sum()) / n, 0.0)
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
            split = _bisect(Xg, sq, sums.pop(node_id), node, workspace, int(seed), n_init, tol_abs, backend)
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


def _all_rows_equal(A) -> bool:
    """Exact test; stops at the first block that differs, so ordinary nodes pay for a row or two."""
    start, step = 1, 1
    while start < A.shape[0]:
        if not bool((A[start:start + step] == A[0]).all()):
            return False
        start, step = start + step, min(step * 4, 1024)
    return True


def _bisect(Xg, sq_all, node_sum, node: TreeNode, workspace, seed: int, n_init, tol_abs: float,
            backend: str):
    """Split one node; returns [(members, member sum, sse)] x 2, or None when it cannot be split."""
    xp = array_module(Xg)
    Xn = _rows(Xg, node.members, workspace)
    if _all_rows_equal(Xn):
        node.sse = 0.0  # the SSE formula leaves float dust; identical points have none
        return None
    sq = sq_all if Xn is Xg else sq_all[node.members if xp is np else xp.asarray(node.members)]
    n = Xn.shape[0]
    k = n_init or _auto_n_init(*Xn.shape)
    node_seed = np.random.SeedSequence([seed, node.id])
    if backend == "cuml":
        labels = two_means_cuml(Xn, int(node_seed.generate_state(1)[0]), n_init=k)
    else:
        labels = two_means(Xn, sq, node_sum, np.random.default_rng(node_seed), n_init=k, tol_abs=tol_abs)
    if labels is None:
        return None
    # Child statistics once per split from one matrix-vector product.
    s1 = (labels.astype(Xn.dtype) @ Xn).astype(xp.float64)
    s0 = node_sum - s1
    n1 = int(labels.sum())
    n0 = n - n1
    sse1 = float(sq[labels].sum()) - float((s1 * s1).sum()) / n1
    sse0 = float(sq[~labels].sum()) - float((s0 * s0).sum()) / n0
    labels_host = to_numpy(labels)
    return [(node.members[~labels_host], s0, max(sse0, 0.0)), (node.members[labels_host], s1, max(sse1, 0.0))]


def divisive_kmeans(X, n_leaves: int, *, seed: int = 0, n_init: int | None = None, backend: str = "auto"):
    """Leaf partition of the divisive tree: (labels (N,) int64 host array, centers (L, D)).

    Like scikit-learn's ``BisectingKMeans(bisecting_strategy="biggest_inertia")``. When X has fewer
    distinct rows than ``n_leaves`` the tree stops early: L < n_leaves, with a TooFewPointsWarning.
    """
    X = _validate_points(X)
    n_leaves = _positive_int(n_leaves, "n_leaves")
    if n_leaves > X.shape[0]:
        raise ValueError(f"n_leaves={n_leaves} exceeds the number of points in X ({X.shape[0]})")
    tree = build_divisive_tree(X, n_leaves, seed=seed, n_init=n_init, backend=backend)
    leaves = tree.leaves()
    if len(leaves) < n_leaves:
        warnings.warn(f"only {len(leaves)} distinct groups in X; returning {len(leaves)} leaves, "
                      f"not n_leaves={n_leaves}", TooFewPointsWarning, stacklevel=2)
    xp = array_module(X)
    return tree.leaf_labels(), xp.stack([leaf.mean for leaf in leaves])


# ---------------------------------------------------------------------------------------------------------
# IPC selection
# ---------------------------------------------------------------------------------------------------------

METHODS = ("divisive", "kmeans")
CENTROIDS = ("mean", "medoid")


@dataclass
class IPCSelection:
    """The ``ipc`` centroids of one class and where each came from (one row per centroid).

    node_ids: tree node id (divisive) or k-means cluster index (kmeans); the same id appears more than
    once only when ``repeated``. levels: depth of the node in the tree (root = 0); -1 for k-means.
    picked_by: "level" (the level scan), "leaf" (the leaf fill), "kmeans", or "repeat" (a copy of an
    earlier row because the class has fewer than ``ipc`` distinct points). members: row indices of X in
    each centroid's node or cluster. n_unique: distinct centroids before repetition.
    """
    centroids: object
    node_ids: np.ndarray
    levels: np.ndarray
    picked_by: list
    members: list
    n_unique: int
    repeated: bool
    method: str
    start_level: int | None = None
    tree: DivisiveTree | None = None


def default_start_level(ipc: int) -> int:
    """ceil(log2(ipc)): the depth at which a balanced binary tree has ipc nodes (0 for ipc = 1)."""
    return int(math.ceil(math.log2(ipc))) if ipc > 1 else 0


def select_ipc_nodes(X, ipc: int, *, method: str = "divisive", start_level: int | None = None,
                     branching: int = 2, seed: int = 0, centroid: str = "mean", n_init: int | None = None,
                     backend: str = "auto") -> IPCSelection:
    """Choose ``ipc`` centroids for one class; see docs/clustering.md for the rule with an example.

    method="divisive" (the multi-scale, level-wise rule):
      1. Grow the divisive tree to ``max_leaves = min(branching * ipc, len(X))`` leaves (fewer if the
         class has fewer distinct points). With branching >= 2 the tree has spare leaves, which is what
         makes ``start_level`` matter; branching=1 gives exactly ipc leaves and every start level selects
         the same set (the public code's behaviour).
      2. Scan depths s, s-1, ..., 0 with s = min(start_level, tree depth) (default ``ceil(log2(ipc))``).
         At each depth take at most one node: among the nodes of that depth that are neither an ancestor
         nor a descendant of a node already taken, and that leave enough untouched leaves to still reach
         ipc non-nested nodes, take the one with the most members (ties: larger SSE, then lower id).
         A node with m leaves below it uses up m - 1 of the spare leaves, so coarse nodes are taken only
         while the budget allows; the root is taken only for ipc = 1.
      3. Fill the remaining places with leaves that are not below a taken node, most members first
         (ties: larger SSE, then lower id).
      The taken nodes are never nested, so no two centroids summarise overlapping points.
    method="kmeans": MGD3's baseline, k-means with k = ipc (k-means++ seeding, best of 3), clusters in
    index order. ``n_init`` applies to the divisive tree's 2-means only.

    Centroid = the node's mean, or with centroid="medoid" its member nearest to that mean.
    A class with fewer than ipc distinct points gets all it has (the leaves of the fully split tree, or
    the distinct rows for k-means), then copies of them in the same order until there are ipc rows; a
    TooFewPointsWarning is issued and ``repeated`` is set so the caller can record it (the sampler gives
    each copy its own noise seed). No points at all is a ValueError.
    """
    X = _validate_points(X)
    ipc = _positive_int(ipc, "ipc")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if centroid not in CENTROIDS:
        raise ValueError(f"centroid must be one of {CENTROIDS}, got {centroid!r}")
    branching = _positive_int(branching, "branching")
    seed = _seed(seed)
    if start_level is not None and (isinstance(start_level, bool)
                                    or not isinstance(start_level, (int, np.integer)) or start_level < 0):
        raise ValueError(f"start_level must be a non-negative integer or None, got {start_level!r}")
    if method == "kmeans":
        result = _select_kmeans(X, ipc, seed=seed, backend=backend)
    else:
        result = _select_divisive(X, ipc, start_level=start_level, branching=branching, seed=seed,
                                  n_init=n_init, backend=backend)
    if centroid == "medoid":
        xp = array_module(X)
        result.centroids = xp.stack([_medoid(X, m, c) for m, c in zip(result.members, result.centroids)])
    if result.repeated:
        warnings.warn(f"class has only {result.n_unique} distinct point(s) for ipc={ipc}; centroids were "
                      f"repeated to fill {ipc} rows", TooFewPointsWarning, stacklevel=3)
    return result


def select_ipc_centroids(X, ipc: int, *, method: str = "divisive", start_level: int | None = None,
                         branching: int = 2, seed: int = 0, centroid: str = "mean", n_init: int | None = None,
                         backend: str = "auto"):
    """(ipc, D) centroids of one class by ``select_ipc_nodes`` (same arguments and rule)."""
    return select_ipc_nodes(X, ipc, method=method, start_level=start_level, branching=branching, seed=seed,
                            centroid=centroid, n_init=n_init, backend=backend).centroids


def _rank_key(node: TreeNode):
    return (-node.size, -node.sse, node.id)


def _select_divisive(X, ipc, *, start_level, branching, seed, n_init, backend) -> IPCSelection:
    xp = array_module(X)
    tree = build_divisive_tree(X, min(branching * ipc, X.shape[0]), seed=seed, n_init=n_init,
                               backend=backend)
    leaves_below = _leaves_below(tree)
    if tree.n_leaves < ipc:  # too few distinct points: everything there is, then copies
        chosen = sorted(tree.leaves(), key=_rank_key)
        picked = ["leaf"] * len(chosen)
        level = None
    else:
        level = min(default_start_level(ipc) if start_level is None else int(start_level), tree.max_depth)
        chosen, picked = [], []
        blocked = set()  # ids of taken nodes and all their ancestors and descendants
        spare = tree.n_leaves - ipc  # leaves that may still be merged away under coarse picks
        for depth in range(level, -1, -1):
            if len(chosen) == ipc:
                break
            candidates = [n for n in tree.nodes if n.depth == depth and n.id not in blocked
                          and leaves_below[n.id] - 1 <= spare]
            if not candidates:
                continue
            node = min(candidates, key=_rank_key)
            chosen.append(node)
            picked.append("level")
            spare -= leaves_below[node.id] - 1
            blocked.update(_subtree(tree, node.id), tree.ancestors(node.id))
        fill = sorted((n for n in tree.leaves() if n.id not in blocked), key=_rank_key)
        chosen += fill[: ipc - len(chosen)]
        picked += ["leaf"] * (len(chosen) - len(picked))
    n_unique = len(chosen)
    rows = [i % n_unique for i in range(ipc)]
    return IPCSelection(
        centroids=xp.stack([chosen[r].mean for r in rows]),
        node_ids=np.array([chosen[r].id for r in rows], dtype=np.int64),
        levels=np.array([chosen[r].depth for r in rows], dtype=np.int64),
        picked_by=[picked[r] if i < n_unique else "repeat" for i, r in enumerate(rows)],
        members=[chosen[r].members for r in rows],
        n_unique=n_unique, repeated=n_unique < ipc, method="divisive", start_level=level, tree=tree)


def _select_kmeans(X, ipc, *, seed, backend) -> IPCSelection:
    xp = array_module(X)
    host = to_numpy(X)
    _, first, inverse = np.unique(host, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    if first.size < ipc:  # distinct rows in order of first appearance, then copies
        order = np.argsort(first, kind="stable")
        groups = [np.flatnonzero(inverse == g) for g in order]
        centres = [X[int(first[g])] for g in order]
        ids = list(range(len(order)))
    else:
        labels, centers, _ = kmeans(X, ipc, seed=seed, backend=backend)
        labels = to_numpy(labels)
        groups = [np.flatnonzero(labels == j) for j in range(ipc)]
        centres = [centers[j] for j in range(ipc)]
        ids = list(range(ipc))
    n_unique = len(groups)
    rows = [i % n_unique for i in range(ipc)]
    return IPCSelection(
        centroids=xp.stack([centres[r] for r in rows]).astype(X.dtype),
        node_ids=np.array([ids[r] for r in rows], dtype=np.int64),
        levels=np.full(ipc, -1, dtype=np.int64),
        picked_by=["kmeans" if i < n_unique else "repeat" for i in range(ipc)],
        members=[groups[r] for r in rows],
        n_unique=n_unique, repeated=n_unique < ipc, method="kmeans")


def _leaves_below(tree: DivisiveTree) -> list:
    counts = [0] * len(tree.nodes)
    for node in reversed(tree.nodes):  # children always have larger ids than their parent
        counts[node.id] = 1 if node.is_leaf else sum(counts[c] for c in node.children)
    return counts


def _subtree(tree: DivisiveTree, node_id: int) -> list:
    out, stack = [], [node_id]
    while stack:
        i = stack.pop()
        out.append(i)
        stack.extend(tree.nodes[i].children)
    return out


def _medoid(X, members: np.ndarray, centre):
    """The member row nearest to ``centre`` (ties: the lowest row index)."""
    xp = array_module(X)
    rows = X[members if xp is np else xp.asarray(members)]
    d2 = ((rows - centre) ** 2).sum(axis=1)
    return rows[int(xp.argmin(d2))]
