"""Compact per-step tangent bases: the distinct bases once, plus an integer index, never the expansion.

Under radius annealing a centroid meets only a few distinct neighbourhoods over the guided steps, so
its per-step bases repeat. Expanded to one basis per (sample, step) they take n x S x D x d floats
(about 800 MB at n = 64, S = 24, D = 4,096, d = 32 in float32); compact, M x D x d for the M distinct
bases (about ten) plus an (n, S) integer table.

- ``CompactBases(bases, index)``: ``bases`` (M, D, d) on any device (numpy, CuPy or torch);
  ``index`` (n, S) host int64, ``index[r, j]`` = the basis of row r at guided step j.
- ``compact_from_parts`` / ``compact_from_plan`` build it from per-centroid ``annealed_bases`` results
  or from the per-class plan layout (``bases``, ``offsets``, ``step_index``); ``concat_compact`` joins
  several (rows of different classes in one sampling batch).
- ``project_at_step(v, compact, j)``: U U^T v for every row with its own step-j basis. It gathers the n
  bases in use at that step, (n, D, d), and projects exactly as ``ops.tangent.project`` does with the
  expanded (n, S, D, d)[:, j]: the values and the arithmetic are the same, so the result is bit-identical.

Everything here is pure; the index stays on the host and goes to the bases' device one step at a time
(n integers).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ops.backend import array_module
from ops.tangent import project


def _namespace_name(x) -> str:
    return type(x).__module__.split(".")[0]


def _index_for(bases, ids: np.ndarray):
    """``ids`` (host int64) as an index array that ``bases`` (numpy, CuPy or torch) accepts."""
    name = _namespace_name(bases)
    if name == "torch":
        import torch  # noqa: PLC0415 - already imported by whoever made ``bases``

        return torch.as_tensor(ids, device=bases.device)
    if name == "cupy":
        return array_module(bases).asarray(ids)
    return ids


def _concatenate(arrays):
    if _namespace_name(arrays[0]) == "torch":
        import torch  # noqa: PLC0415

        return torch.cat(list(arrays))
    return array_module(arrays[0]).concatenate(list(arrays))


@dataclass(frozen=True)
class CompactBases:
    """Distinct tangent bases and which one each (row, guided step) uses; see the module docstring."""

    bases: object          # (M, D, d)
    index: np.ndarray      # (n, S) host int64 in [0, M)

    def __post_init__(self):
        index = np.asarray(self.index)
        if index.ndim != 2 or index.dtype.kind not in "iu":
            raise ValueError(f"index must be a 2-D integer array (rows, steps), got {index.dtype} {index.shape}")
        if getattr(self.bases, "ndim", None) != 3:
            raise ValueError(f"bases must be (M, D, d), got shape {getattr(self.bases, 'shape', None)}")
        m = int(self.bases.shape[0])
        if index.size and (int(index.min()) < 0 or int(index.max()) >= m):
            raise ValueError(f"index holds basis ids outside [0, {m})")
        object.__setattr__(self, "index", index.astype(np.int64, copy=False))

    @property
    def n_rows(self) -> int:
        return int(self.index.shape[0])

    @property
    def n_steps(self) -> int:
        return int(self.index.shape[1])

    def rows(self, rows) -> CompactBases:
        """The same bases for a subset of rows (a slice or host integer array): a sampling chunk."""
        return CompactBases(self.bases, self.index[rows])

    def at_step(self, step: int):
        """(n, D, d) bases of every row at guided step ``step``, on the bases' device."""
        if not 0 <= step < self.n_steps:
            raise ValueError(f"step must be in [0, {self.n_steps}), got {step}")
        return self.bases[_index_for(self.bases, self.index[:, step])]

    def expand(self):
        """(n, S, D, d): the expanded form, for comparisons only (it is what this class avoids)."""
        return self.bases[_index_for(self.bases, self.index)]


def project_at_step(v, compact: CompactBases, step: int):
    """U_r U_r^T v_r for each row r, U_r = the row's basis at guided step ``step``; ``v`` (n, D).

    Equal, bit for bit, to ``ops.tangent.project(v, compact.expand()[:, step])``.
    """
    if v.shape[0] != compact.n_rows:
        raise ValueError(f"v has {v.shape[0]} rows, the bases index {compact.n_rows}")
    return project(v, compact.at_step(step))


def pad_basis(basis, dim: int):
    """``basis`` (..., D, d) with zero columns appended up to ``dim``: U U^T is unchanged, so bases of
    different rank can share one array. On the basis' device (numpy or CuPy)."""
    d = basis.shape[-1]
    if d > dim:
        raise ValueError(f"basis has {d} columns, more than dim={dim}")
    if d == dim:
        return basis
    if _namespace_name(basis) == "torch":
        import torch  # noqa: PLC0415

        return torch.nn.functional.pad(basis, (0, dim - d))
    xp = array_module(basis)
    out = xp.zeros(basis.shape[:-1] + (dim,), dtype=basis.dtype)
    out[..., :d] = basis
    return out


def compact_from_parts(parts: Sequence[tuple], dim: int | None = None) -> CompactBases:
    """Join per-row ``(bases_r (M_r, D, d_r), step_index_r (S,))`` pairs (``annealed_bases`` results).

    Row r's ids are offset by the bases of the rows before it; bases narrower than ``dim`` (default: the
    widest) get zero columns. No basis is copied more than once.
    """
    if not parts:
        raise ValueError("parts is empty")
    dim = max(int(b.shape[-1]) for b, _ in parts) if dim is None else int(dim)
    steps = {np.asarray(s).shape for _, s in parts}
    if len(steps) != 1:
        raise ValueError(f"every step_index must have the same length, got shapes {sorted(steps)}")
    offsets = np.cumsum([0] + [int(b.shape[0]) for b, _ in parts[:-1]])
    index = np.stack([np.asarray(s, dtype=np.int64) + off for (_, s), off in zip(parts, offsets)])
    bases = _concatenate([pad_basis(b, dim) for b, _ in parts])
    return CompactBases(bases, index)


def compact_from_plan(bases, offsets, step_index) -> CompactBases:
    """The per-class plan layout (``bases`` (sum M_r, D, d), ``offsets`` (n + 1,), ``step_index`` (n, S)
    with per-row local ids) as a CompactBases; ``expand()`` equals ``pipeline.centroids.expand_bases``."""
    offsets = np.asarray(offsets, dtype=np.int64)
    step_index = np.asarray(step_index, dtype=np.int64)
    if offsets.ndim != 1 or step_index.ndim != 2 or offsets.shape[0] != step_index.shape[0] + 1:
        raise ValueError(f"offsets ({offsets.shape}) must have one entry more than step_index has rows "
                         f"({step_index.shape})")
    return CompactBases(bases, offsets[:-1, None] + step_index)


def concat_compact(items: Sequence[CompactBases]) -> CompactBases:
    """Rows of several CompactBases (e.g. of different classes) in one: bases concatenated (narrower ones
    padded with zero columns), ids shifted. Row order is the order of ``items``."""
    if not items:
        raise ValueError("items is empty")
    if len({c.n_steps for c in items}) != 1:
        raise ValueError("every part must have the same number of guided steps")
    dim = max(int(c.bases.shape[-1]) for c in items)
    offsets = np.cumsum([0] + [int(c.bases.shape[0]) for c in items[:-1]])
    index = np.concatenate([c.index + off for c, off in zip(items, offsets)])
    return CompactBases(_concatenate([pad_basis(c.bases, dim) for c in items]), index)
