"""ops.bases: the compact (distinct bases + index) form projects exactly as the expanded (n, S, D, d) form."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ops.backend import cupy_available
from ops.bases import (
    CompactBases,
    compact_from_parts,
    compact_from_plan,
    concat_compact,
    pad_basis,
    project_at_step,
)
from ops.tangent import annealed_bases, project

needs_cupy = pytest.mark.skipif(not cupy_available(), reason="needs CuPy with a CUDA device")


def random_plan(rng, n=5, steps=7, d_amb=48, dim=4):
    """A per-class plan in the pipeline's layout: per-row distinct bases, offsets, local step ids."""
    counts = rng.integers(1, 4, n)
    bases = np.stack([np.linalg.qr(rng.standard_normal((d_amb, dim)))[0] for _ in range(counts.sum())])
    offsets = np.concatenate([[0], np.cumsum(counts)])
    step_index = np.stack([np.sort(rng.integers(0, c, steps)) for c in counts])
    return bases.astype(np.float32), offsets, step_index


def expanded(bases, offsets, step_index):
    """The expansion pipeline/centroids.py's expand_bases does today, written out."""
    return bases[offsets[:-1, None] + step_index]


@pytest.mark.parametrize("seed", range(3))
def test_compact_projection_equals_expanded_exactly(seed):
    rng = np.random.default_rng(seed)
    bases, offsets, step_index = random_plan(rng)
    full = expanded(bases, offsets, step_index)
    compact = compact_from_plan(bases, offsets, step_index)
    np.testing.assert_array_equal(compact.expand(), full)
    v = rng.standard_normal((5, 48)).astype(np.float32)
    for j in range(step_index.shape[1]):
        np.testing.assert_array_equal(project_at_step(v, compact, j), project(v, full[:, j]))


def test_compact_projection_on_torch_equals_expanded_exactly():
    rng = np.random.default_rng(4)
    bases, offsets, step_index = random_plan(rng, n=6, steps=5)
    full = torch.from_numpy(expanded(bases, offsets, step_index))
    compact = compact_from_plan(torch.from_numpy(bases), offsets, step_index)
    v = torch.from_numpy(rng.standard_normal((6, 48)).astype(np.float32))
    for j in range(5):
        assert torch.equal(project_at_step(v, compact, j), project(v, full[:, j]))


def test_chunks_of_rows_project_like_the_whole():
    rng = np.random.default_rng(5)
    compact = compact_from_plan(*random_plan(rng, n=8))
    v = rng.standard_normal((8, 48)).astype(np.float32)
    whole = project_at_step(v, compact, 3)
    parts = [project_at_step(v[r], compact.rows(r), 3) for r in (slice(0, 3), slice(3, 8))]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_compact_from_parts_matches_annealed_bases_per_row():
    rng = np.random.default_rng(6)
    points = rng.standard_normal((80, 32)) * np.linspace(3, 0.2, 32)
    parts = []
    for c in range(3):
        centre = points[c * 10]
        radius = float(np.sort(np.linalg.norm(points - centre, axis=1))[10])
        parts.append(annealed_bases(points, centre, dim=3, radius=radius, n_steps=12, warm_steps=8,
                                    max_multiplier=3.0))
    compact = compact_from_parts(parts)
    assert compact.bases.shape[0] == sum(b.shape[0] for b, _ in parts)
    full = compact.expand()
    for r, (b, idx) in enumerate(parts):
        np.testing.assert_array_equal(full[r], b[idx])


def test_concat_joins_classes_and_pads_narrow_bases():
    rng = np.random.default_rng(7)
    a = compact_from_plan(*random_plan(rng, n=3, dim=4))
    bases, offsets, step_index = random_plan(rng, n=2, dim=2)
    b = compact_from_plan(bases, offsets, step_index)
    joined = concat_compact([a, b])
    assert joined.n_rows == 5 and joined.bases.shape[-1] == 4
    v = rng.standard_normal((5, 48)).astype(np.float32)
    for j in range(a.n_steps):
        np.testing.assert_array_equal(project_at_step(v, joined, j)[:3], project_at_step(v[:3], a, j))
        np.testing.assert_allclose(project_at_step(v, joined, j)[3:], project_at_step(v[3:], b, j), atol=1e-6)


def test_pad_basis_keeps_the_projector():
    rng = np.random.default_rng(8)
    u = np.linalg.qr(rng.standard_normal((20, 3)))[0]
    padded = pad_basis(u, 6)
    assert padded.shape == (20, 6) and np.all(padded[:, 3:] == 0)
    np.testing.assert_array_equal(padded @ padded.T, u @ u.T)
    t = pad_basis(torch.from_numpy(u), 6)
    assert torch.equal(t, torch.from_numpy(padded))
    with pytest.raises(ValueError, match="dim"):
        pad_basis(u, 2)


def test_bad_compact_inputs():
    bases = np.zeros((2, 5, 1))
    with pytest.raises(ValueError, match="index"):
        CompactBases(bases, np.array([[0, 2]]))
    with pytest.raises(ValueError, match="index"):
        CompactBases(bases, np.array([0, 1]))
    with pytest.raises(ValueError, match="bases"):
        CompactBases(np.zeros((5, 1)), np.array([[0]]))
    with pytest.raises(ValueError, match="offsets"):
        compact_from_plan(bases, np.array([0, 2]), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="step"):
        CompactBases(bases, np.zeros((1, 3), int)).at_step(3)
    with pytest.raises(ValueError, match="rows"):
        project_at_step(np.zeros((2, 5)), CompactBases(bases, np.zeros((1, 3), int)), 0)


@pytest.mark.gpu
@needs_cupy
def test_compact_projection_on_cupy_equals_expanded_exactly():
    import cupy

    rng = np.random.default_rng(9)
    bases, offsets, step_index = random_plan(rng)
    compact = compact_from_plan(cupy.asarray(bases), offsets, step_index)
    full = cupy.asarray(expanded(bases, offsets, step_index))
    v = cupy.asarray(rng.standard_normal((5, 48)).astype(np.float32))
    for j in range(step_index.shape[1]):
        out = project_at_step(v, compact, j)
        assert isinstance(out, cupy.ndarray)
        assert bool((out == project(v, full[:, j])).all())
