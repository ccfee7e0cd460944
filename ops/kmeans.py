"""k-means kernels: a batched 2-means for bisection and a plain k-means (the MGD3 baseline).

Both are written once against the array API shared by numpy and CuPy (``xp`` = ``ops.backend.array_module``),
so the same lines run on a GPU when the data lives there (backend "cupy"). Random draws always come from a
host ``numpy.random.Generator`` (the few values they depend on are copied to the host first), so a seed
means the same thing on numpy and CuPy and both backends pick the same starts up to float rounding.
Backend "cuml" (asked for explicitly, never by "auto") hands the splits and the baseline to cuML's KMeans,
which seeds itself from ``random_state``: same seed, a different (equally valid) clustering.

Speed notes (why the code looks the way it does; measured on 2 cores, D = 4,096 float32):
- Squared distances are never formed point by point. For two centres the assignment is a single
  projection: x is closer to c1 than to c0 iff 2 x.(c1 - c0) > |c1|^2 - |c0|^2, one matrix-vector
  product per Lloyd step. The node's sum is known, so the other cluster's sum is a subtraction, and the
  SSE of a partition follows without touching X again: SSE = sum |x|^2 - n1 |c1|^2 - n0 |c0|^2.
- Several starts run side by side for two steps (a column each in the same products), then only the
  best continues; its later steps update the cluster sum from the few points that changed side.
- A 1-column GEMM is 3-4x slower than a matrix-vector product in OpenBLAS, so single columns use the latter.
- On a GPU every value read back to the host is a synchronisation, so the reads are batched (``read_back``):
  one per Lloyd step of the 2-means winner and of the baseline, a few more per split (see ``two_means``).
  With numpy's arithmetic (the host, and the GPU path run on numpy by tests/test_host_syncs.py) the results
  are bit for bit those of the unbatched code. On CuPy the zero-filled masked sums (``_rows_sum``) reduce in
  CuPy's own grouping, so a Lloyd step's running sum may differ in its last bit from a gathered sum; it only
  steers the steps, and the tree's sums and SSEs come from the final labels.
"""
from __future__ import annotations

import numpy as np

from ops.backend import array_module, backend_for_array, to_numpy

# Relative tolerance on the centre shift, as scikit-learn uses it: a run stops when the squared shift
# summed over the centres is at most tol x the mean per-feature variance of the whole data set.
DEFAULT_TOL = 1e-4
DEFAULT_MAX_ITER = 100


def choose_backend(X, backend="auto") -> str:
    """"numpy", "cupy" or "cuml" for data ``X``: see ``ops.backend.backend_for_array`` ("auto" follows the
    data and never picks cuML)."""
    return backend_for_array(X, backend)


def _sample_d2(d2_host: np.ndarray, rng: np.random.Generator) -> int:
    """One k-means++ draw: an index with probability proportional to its squared distance."""
    weights = np.maximum(d2_host.astype(np.float64), 0.0)
    total = weights.sum()
    if not total > 0.0:
        return -1
    return int(rng.choice(weights.size, p=weights / total))


class Split:
    """A 2-means split of one node, with what the divisive tree needs from it in one place.

    labels: oriented boolean labels on Xn's device (the node's first row on side 0); labels_host: the same
    on the host; s1, s0: float64 member sums of side 1 (``labels @ Xn``) and side 0 (``node_sum - s1``) on
    the device; norms: host float64 ``[|s1|^2, |s0|^2]``. ``identical``: the node's rows are all equal (no
    split; the other fields are None).
    """

    __slots__ = ("identical", "labels", "labels_host", "norms", "s0", "s1")

    def __init__(self, labels=None, labels_host=None, s1=None, s0=None, norms=None, identical=False):
        self.labels, self.labels_host, self.s1, self.s0, self.norms = labels, labels_host, s1, s0, norms
        self.identical = identical


IDENTICAL = Split(identical=True)


def read_back(parts) -> np.ndarray:
    """One device-to-host transfer of several device values, as one float64 vector (exact for the counts,
    booleans and float32/float64 values it carries)."""
    xp = array_module(parts[0])
    return to_numpy(xp.concatenate([xp.reshape(p, (-1,)).astype(xp.float64) for p in parts]))


def finish_split(Xn, labels, node_sum):
    """(oriented labels, s1, s0, device [|s1|^2, |s0|^2]) of a final split, all on the device: see ``_oriented``."""
    xp = array_module(Xn)
    labels = _oriented(labels)
    s1 = (labels.astype(Xn.dtype) @ Xn).astype(xp.float64)
    s0 = node_sum - s1
    return labels, s1, s0, xp.stack([(s1 * s1).sum(), (s0 * s0).sum()])


def two_means(Xn, sq_norms, sq_host, node_sum, rng: np.random.Generator, *, n_init: int = 4,
              tol_abs: float = 0.0, max_iter: int = DEFAULT_MAX_ITER, explore_iter: int = 2):
    """Seeded 2-means of the rows of ``Xn``: the best of ``n_init`` k-means++ starts.

    Xn: (n, D) float array (numpy or CuPy), best centred on the whole data set's mean as scikit-learn
    does (the formulas below subtract large numbers otherwise); sq_norms: (n,) float64 |x|^2 of its
    rows on Xn's device, sq_host: the same on the host; node_sum: (D,) float64 sum of its rows, so that
    the cluster-0 sum is node_sum - s1 for free. tol_abs: stop when the squared centre shift (both
    centres) is at most this.
    All starts run ``explore_iter`` Lloyd steps side by side; the one with the lowest SSE then runs to
    convergence (labels unchanged, shift <= tol_abs, or ``max_iter``). Pruning early keeps several starts
    cheap: after two steps the ranking of 2-means starts rarely changes, and most steps are spent later.
    Returns a ``Split`` (``IDENTICAL`` when every row is the same), or None when no start separates the
    points (numerically identical points).

    Host round trips (each one a synchronisation on a GPU) are batched: one for the k-means++ draws (with
    the all-rows-equal test), one for the first two exploration steps (the second is computed before the
    first is read, and recomputed only if a start died), and one per Lloyd step of the winner, which
    carries the previous step's centre shift, this step's moved counts and, on a GPU, the finished split
    of the current labels, so the step that stops needs no further transfer.
    """
    xp = array_module(Xn)
    on_device = xp is not np
    n = Xn.shape[0]
    k = max(1, min(int(n_init), n - 1))
    total_sq = float(sq_host.sum())

    # k-means++ for two centres: a uniform first point per start, then a D^2-weighted second one.
    first = rng.choice(n, size=k, replace=False)
    A = Xn[xp.asarray(first)]
    d2 = sq_norms[:, None] - 2.0 * _matmul_columns(Xn, A.T) + (A * A).sum(axis=1, dtype=xp.float64)[None, :]
    if on_device:  # the exact all-equal test rides along with the draws' distances
        host = read_back([(Xn == Xn[0]).all(), d2])
        identical, d2_host = bool(host[0]), host[1:].reshape(n, k)
    else:
        identical, d2_host = all_rows_equal(Xn), d2
    if identical:
        return IDENTICAL
    second = np.array([_sample_d2(d2_host[:, j], rng) for j in range(k)])
    usable = np.flatnonzero(second >= 0)
    if usable.size == 0:
        return None
    C1, C0 = A[xp.asarray(usable)], Xn[xp.asarray(second[usable])]

    # Exploration: every start, side by side, a few steps; step t + 1 is computed before step t is read.
    explore = max(1, explore_iter)
    L, C1, C0, stats = _explore_step(Xn, C1, C0, node_sum)
    known = spec = spec_known = None
    for t in range(explore):
        last = t + 1 == explore
        if known is None:
            if last:
                known = read_back([stats]).reshape(3, -1)
            else:
                spec = _explore_step(Xn, C1, C0, node_sum)
                both = read_back([xp.concatenate([stats, spec[3]], axis=1)]).reshape(3, -1)
                m = C1.shape[0]
                known, spec_known = both[:, :m], both[:, m:]
        sse, n1s = _pair_sse(known, n, total_sq)
        ok = np.isfinite(sse)
        if not ok.any():
            return None
        if not ok.all():
            keep = xp.asarray(np.flatnonzero(ok))
            L, C1, C0, sse, n1s = L[:, keep], C1[keep], C0[keep], sse[ok], n1s[ok]
            spec = None  # computed from every start: redo the next step from the survivors
        if last:
            break
        if spec is not None:
            (L, C1, C0, stats), known, spec = spec, spec_known, None
        else:
            (L, C1, C0, stats), known = _explore_step(Xn, C1, C0, node_sum), None
    j = int(np.argmin(sse))
    labels, c1, c0 = L[:, j], C1[j], C0[j]
    n1 = int(n1s[j])
    # The winner: the cluster-1 sum is kept up to date from the points that changed side, which after
    # the first steps are few, so an iteration costs about one matrix-vector product.
    s1 = c1.astype(xp.float64) * n1  # float32 mean x count: exact enough to steer Lloyd; final sums are exact
    new = _assign_two(Xn, c1[None, :], c0[None, :])[:, 0]
    shift = done = None
    for step in range(max_iter):
        moved_in = new & ~labels
        moved_out = labels & ~new
        parts = ([shift] if shift is not None else []) + [moved_in.sum(), moved_out.sum()]
        if on_device:  # the split as it stands, in case this step stops
            done = finish_split(Xn, labels, node_sum)
            parts += [done[3], done[0]]
        host = read_back(parts)
        if shift is not None:
            if host[0] <= tol_abs:
                break
            host = host[1:]
        n_in, n_out = int(host[0]), int(host[1])
        if n_in + n_out == 0:
            break
        n1_new = n1 + n_in - n_out
        if n1_new == 0 or n1_new == n:  # only float ties can empty a side; keep the last good split
            break
        labels, n1, done = new, n1_new, None
        if n_in + n_out > n // 4:
            s1 = (labels.astype(Xn.dtype) @ Xn).astype(xp.float64)
        else:
            s1 = s1 + _rows_sum(Xn, moved_in) - _rows_sum(Xn, moved_out)
        new_c1 = (s1 / n1).astype(Xn.dtype)
        new_c0 = ((node_sum - s1) / (n - n1)).astype(Xn.dtype)
        shift = ((new_c1 - c1) ** 2).sum() + ((new_c0 - c0) ** 2).sum()
        c1, c0 = new_c1, new_c0
        if step + 1 < max_iter:
            new = _assign_two(Xn, c1[None, :], c0[None, :])[:, 0]
    if done is None:
        done = finish_split(Xn, labels, node_sum)
        host = read_back([done[3], done[0]])
    else:
        host = host[-(n + 2):]
    labels, s1, s0, _ = done
    return Split(labels, host[2:] > 0.5, s1, s0, host[:2])


def _rows_sum(Xn, mask):
    """float64 sum of the rows of ``Xn`` where ``mask``. On a GPU a boolean gather must read back how many
    rows it selects; there the other rows are zeroed instead, which adds the same terms in the same order
    (plus exact zeros), so the sum is the same."""
    xp = array_module(Xn)
    if xp is np:
        return Xn[mask].sum(axis=0, dtype=np.float64)
    return xp.where(mask[:, None], Xn, 0).sum(axis=0, dtype=xp.float64)


def all_rows_equal(A) -> bool:
    """Exact test on the host; stops at the first block that differs, so ordinary nodes pay for a row or two."""
    start, step = 1, 1
    while start < A.shape[0]:
        if not bool((A[start:start + step] == A[0]).all()):
            return False
        start, step = start + step, min(step * 4, 1024)
    return True


def _oriented(labels):
    """The same split with the node's first row always on side 0 (False).

    Several starts often reach the same partition with the sides swapped, and which of them wins the
    SSE comparison is decided by float rounding, which differs between BLAS and cuBLAS. Fixing the
    orientation makes the children's order (and so node ids and the per-node seeds below them) a
    function of the partition alone, so numpy and CuPy build the same tree. (An exclusive or with the
    first label: no host round trip.)
    """
    return labels ^ labels[0]


def _matmul_columns(A, B):
    """A @ B for a B of a few columns. OpenBLAS runs a few-column GEMM on a big A 2-4x slower than the
    same number of matrix-vector products, so there the columns go one by one; small A (where Python
    overhead dominates) and GPUs take the GEMM."""
    if array_module(A) is not np or A.size < (1 << 20):
        return A @ B
    columns = np.ascontiguousarray(B.T)  # a strided vector would drop numpy off the BLAS path
    return np.stack([A @ column for column in columns], axis=1)


def _assign_two(Xn, C1, C0):
    """(n, k) booleans: row closer to C1[j] than to C0[j] (ties go to C0), for every column j."""
    xp = array_module(Xn)
    W = (C1 - C0).T
    b = (0.5 * ((C1 * C1).sum(axis=1, dtype=xp.float64) - (C0 * C0).sum(axis=1, dtype=xp.float64)))
    return _matmul_columns(Xn, W) > b.astype(Xn.dtype)[None, :]


def _explore_step(Xn, C1, C0, node_sum):
    """One Lloyd step of every start: (labels (n, k), new C1, new C0, device stats (3, k)).

    stats rows: side-1 counts, |c1|^2 and |c0|^2 of the float64 means (``_pair_sse`` turns them into each
    partition's SSE on the host)."""
    xp = array_module(Xn)
    n = Xn.shape[0]
    L = _assign_two(Xn, C1, C0)
    n1 = L.sum(axis=0).astype(xp.float64)
    S1 = _matmul_columns(Xn.T, L.astype(Xn.dtype)).T.astype(xp.float64)
    n1_safe = xp.clip(n1, 1, n - 1)
    C1 = S1 / n1_safe[:, None]
    C0 = (node_sum[None, :] - S1) / (n - n1_safe)[:, None]
    stats = xp.stack([n1, (C1 * C1).sum(axis=1), (C0 * C0).sum(axis=1)])
    return L, C1.astype(Xn.dtype), C0.astype(Xn.dtype), stats


def _pair_sse(stats: np.ndarray, n: int, total_sq: float):
    """(SSE of each two-way partition around its own means, inf when a side is empty; side-1 counts), from
    host stats: sum |x|^2 - n1 |c1|^2 - n0 |c0|^2."""
    n1, c1sq, c0sq = stats
    n1_safe = np.clip(n1, 1, n - 1)
    sse = total_sq - n1_safe * c1sq - (n - n1_safe) * c0sq
    sse[(n1 == 0) | (n1 == n)] = np.inf
    return sse, n1


def tol_from_variance(X, tol: float) -> float:
    """``tol`` x the mean per-feature variance of ``X`` (in float64): the absolute bound on the squared centre
    shift that this module's kernels stop at, as scikit-learn scales its ``tol``."""
    xp = array_module(X)
    return float(tol) * float(X.var(axis=0, dtype=xp.float64).mean())


def cuml_tol(tol_abs: float) -> float:
    """The ``tol`` to hand cuML for this module's stopping rule.

    cuML passes ``tol`` unscaled to its Lloyd loop, which stops when the squared centre shift summed over the
    centres is *strictly below* it; this module stops when that shift is *at most* ``tol_abs`` (``tol`` already
    scaled by the data's variance, ``tol_from_variance``), or when no label changes (a zero shift). The next
    double above ``tol_abs`` turns cuML's ``<`` into ``<=``, and makes ``tol_abs = 0`` stop at a zero shift
    instead of running to ``max_iter``.
    """
    return float(np.nextafter(max(float(tol_abs), 0.0), np.inf))


def two_means_cuml(Xn, seed: int, *, n_init: int = 4, max_iter: int = DEFAULT_MAX_ITER, tol_abs: float = 0.0):
    """Labels of a cuML 2-means of the rows of ``Xn`` (same contract as ``two_means``).

    cuML's own seeding: ``init="scalable-k-means++"`` (k-means||) drawn by cuML from ``random_state=seed``,
    best of ``n_init``. It does not use the host generator of ``two_means``, so for the same seed the split
    differs from the numpy/cupy one; the tree is reproducible for a given cuML version and GPU. It stops by
    the same rule as ``two_means``: ``tol_abs`` is absolute (see ``cuml_tol``).
    """
    from cuml.cluster import KMeans  # noqa: PLC0415 - optional, GPU only

    model = KMeans(n_clusters=2, n_init=int(n_init), max_iter=max_iter, tol=cuml_tol(tol_abs),
                   random_state=int(seed), init="scalable-k-means++", output_type="cupy")
    labels = model.fit(Xn).labels_.astype(bool)
    if bool(labels.all()) or not bool(labels.any()):
        return None
    return _oriented(labels)


def kmeans(X, k: int, *, seed: int = 0, n_init: int = 3, max_iter: int = 300, tol: float = DEFAULT_TOL,
           backend: str = "auto"):
    """Plain Lloyd k-means with k-means++ seeding; best of ``n_init`` runs. Returns (labels, centers, sse).

    Needs at least ``k`` distinct rows (the caller checks); an emptied cluster is re-seeded with the point
    farthest from its centre, as scikit-learn does. Backends ("auto" follows the data, see
    ``ops.backend.backend_for_array``): "numpy" and "cupy" run this Lloyd loop with the same host-drawn
    k-means++ starts; "cuml" runs cuML's KMeans with its own seeding (``random_state=seed``), the labels
    and centres coming back as CuPy arrays. Labels and centres live on X's device.
    """
    backend = choose_backend(X, backend)
    if backend == "cuml":
        from cuml.cluster import KMeans  # noqa: PLC0415 - optional, GPU only

        # the same stopping point as the Lloyd loop below: tol scaled by X's variance, "<=" (see cuml_tol)
        model = KMeans(n_clusters=int(k), n_init=int(n_init), max_iter=max_iter,
                       tol=cuml_tol(tol_from_variance(X, tol)),
                       random_state=int(seed), init="scalable-k-means++", output_type="cupy")
        model.fit(X)
        xp = array_module(X)
        labels = model.labels_.astype(xp.int64)
        centers = model.cluster_centers_.astype(X.dtype)
        return labels, centers, _sse(X, labels, centers)
    rng = np.random.default_rng(seed)
    mean = X.mean(axis=0)
    Xc = X - mean  # centring keeps |x|^2 - 2 x.c + |c|^2 accurate in float32
    sq = (Xc * Xc).sum(axis=1)
    tol_abs = tol * float(sq.sum()) / (X.shape[0] * X.shape[1])
    best = None
    for _ in range(int(n_init)):
        centers = _kmeanspp(Xc, sq, k, rng)
        labels = None
        for _ in range(max_iter):
            labels, d2 = _assign(Xc, sq, centers)
            new, shift = _update(Xc, labels, d2, centers)
            centers = new
            if shift <= tol_abs:
                break
        labels, d2 = _assign(Xc, sq, centers)
        sse = float(d2.sum())
        if best is None or sse < best[2]:
            best = (labels, centers, sse)
    labels, centers, sse = best
    return labels, centers + mean, sse


def _kmeanspp(Xc, sq, k, rng):
    xp = array_module(Xc)
    n = Xc.shape[0]
    chosen = [int(rng.integers(n))]
    d2 = xp.maximum(sq - 2.0 * (Xc @ Xc[chosen[0]]) + sq[chosen[0]], 0.0)
    for _ in range(1, k):
        i = _sample_d2(to_numpy(d2), rng)
        if i < 0:  # fewer distinct points than k: the caller guards, this only keeps the loop total
            i = int(rng.integers(n))
        chosen.append(i)
        d2 = xp.minimum(d2, xp.maximum(sq - 2.0 * (Xc @ Xc[i]) + sq[i], 0.0))
    return Xc[xp.asarray(chosen)].copy()


def _assign(Xc, sq, centers):
    xp = array_module(Xc)
    d2 = sq[:, None] - 2.0 * (Xc @ centers.T) + (centers * centers).sum(axis=1)[None, :]
    labels = xp.argmin(d2, axis=1)
    return labels, xp.maximum(d2[xp.arange(Xc.shape[0]), labels], 0.0)


def _update(Xc, labels, d2, centers):
    """(new centres, their squared shift from ``centers``) after one Lloyd step; an emptied cluster takes the
    point farthest from its centre. One host read (the counts with the shift) unless a cluster emptied."""
    xp = array_module(Xc)
    k = centers.shape[0]
    onehot = (labels[:, None] == xp.arange(k)[None, :]).astype(Xc.dtype)
    counts = onehot.sum(axis=0)
    new = (onehot.T @ Xc) / xp.maximum(counts, 1)[:, None]
    host = read_back([counts, ((new - centers) ** 2).sum()])
    empty = np.flatnonzero(host[:k] == 0)
    if not empty.size:
        return new, float(host[k])
    far = np.argsort(-to_numpy(d2), kind="stable")[: empty.size]
    new[xp.asarray(empty)] = Xc[xp.asarray(far)]
    return new, float(((new - centers) ** 2).sum())


def _sse(X, labels, centers) -> float:
    diff = X - centers[labels]
    return float((diff * diff).sum())
