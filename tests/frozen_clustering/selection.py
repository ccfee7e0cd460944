"""The multi-scale IPC centroid selection on a divisive tree, and the k-means baseline (docs/method.md section 2).

``select_ipc_nodes`` picks ``ipc`` nodes of a tree grown past ``ipc`` leaves by the level-wise rule
documented on that function and in docs/clustering.md; ``select_ipc_centroids`` returns just their
centroids. Arrays as in ``ops.clustering``: CuPy inputs stay on the GPU, member indices are host numpy.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from ops.backend import array_module, to_numpy

from .clustering import (
    DivisiveTree,
    TooFewPointsWarning,
    TreeNode,
    as_seed,
    build_divisive_tree,
    positive_int,
    validate_points,
)
from .kmeans import kmeans

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
    X = validate_points(X)
    ipc = positive_int(ipc, "ipc")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if centroid not in CENTROIDS:
        raise ValueError(f"centroid must be one of {CENTROIDS}, got {centroid!r}")
    branching = positive_int(branching, "branching")
    seed = as_seed(seed)
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
