"""Stage 3's sample health check: score every sampled latent against its class's real latents, and under
``health.policy: regenerate`` sample a flagged one again with its next noise attempt.

The score is ``ops.health.health_scores``: the final latent's distance to the nearest real latent of its class,
over the class's median nearest-neighbour spacing. A sample scoring above ``health.threshold`` is flagged.

Regeneration rule (deterministic): a flagged sample (class y, k) is sampled again with noise attempt
1, 2, ... ``health.max_attempts - 1`` (noise a pure function of (seed, y, k, attempt),
``pipeline.models.noise.sample_seed``), same centroid and bases; the first attempt that is not flagged
is kept. If every attempt is flagged, the attempt with the lowest score is kept and stays flagged. The
flagged rows of a unit are resampled together, in row order, so the result depends only on the unit.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ops.health import flag, health_scores, reference_spacing
from pipeline.common.outputs import OutputDir
from pipeline.distill.plan import read_class_latents

REFERENCE_CACHE = 16  # classes whose real latents an actor keeps
HEALTH_COLUMNS = ("health_score", "flagged", "attempt")  # manifest columns, one value per image


class HealthCheck:
    """Per-class references (real latents and their spacing), loaded once per actor, and the policy."""

    def __init__(self, out: OutputDir, threshold: float, policy: str = "keep", max_attempts: int = 1):
        self.out, self.threshold, self.policy, self.max_attempts = out, float(threshold), policy, int(max_attempts)
        self.refs: OrderedDict = OrderedDict()

    def reference(self, class_name: str) -> tuple[np.ndarray, float]:
        if class_name not in self.refs:
            _, X = read_class_latents(self.out.latents, class_name)
            self.refs[class_name] = (X, reference_spacing(X) if X.shape[0] >= 2 else 0.0)
            while len(self.refs) > REFERENCE_CACHE:
                self.refs.popitem(last=False)
        self.refs.move_to_end(class_name)
        return self.refs[class_name]

    def scores(self, class_names: list[str], latents) -> np.ndarray:
        """(n,) score of each row; NaN where the class has too few distinct real latents to measure."""
        flat = np.asarray(latents, dtype=np.float32).reshape(len(class_names), -1)
        scores = np.full(len(class_names), np.nan)
        for name in dict.fromkeys(class_names):
            rows = [r for r, c in enumerate(class_names) if c == name]
            X, spacing = self.reference(name)
            if spacing > 0:
                scores[rows] = health_scores(flat[rows], X, spacing)
        return scores

    def sample(self, sample_fn, class_names: list[str], latents) -> dict:
        """Score ``latents`` (n, ...), regenerate flagged rows per the policy with
        ``sample_fn(rows, attempt) -> latents of those rows``; returns {"latents", "health_score",
        "flagged", "attempt"} (the latents a torch tensor or array like the input, the rest (n,) arrays)."""
        scores = self.scores(class_names, latents)
        attempt = np.zeros(len(scores), dtype=np.int64)
        flagged = flag(np.nan_to_num(scores, nan=0.0), self.threshold)
        if self.policy == "regenerate" and flagged.any():
            latents = latents.clone() if hasattr(latents, "clone") else np.array(latents)  # writable copy
            for a in range(1, self.max_attempts):
                rows = np.flatnonzero(flagged)
                if rows.size == 0:
                    break
                fresh = sample_fn(rows, a)
                fresh_scores = self.scores([class_names[r] for r in rows], fresh)
                better = fresh_scores < scores[rows]
                for i, r in enumerate(rows):
                    if better[i]:
                        latents[r] = fresh[i]
                        scores[r], attempt[r] = fresh_scores[i], a
                flagged = flag(np.nan_to_num(scores, nan=0.0), self.threshold)
        return {"latents": latents, "health_score": scores, "flagged": flagged, "attempt": attempt}

    def sample_rows(self, sampler, rows, centroids, bases, basis_index) -> dict:
        """``sampler.sample_rows`` for a unit's rows ((class name, label, k), ...), then ``sample``."""
        ys, ks = [y for _, y, _ in rows], [k for _, _, k in rows]

        def again(sel, attempt):
            sel = [int(r) for r in sel]
            return sampler.sample_rows([ys[r] for r in sel], [ks[r] for r in sel],
                                       None if centroids is None else centroids[sel], bases,
                                       None if basis_index is None else basis_index[sel],
                                       attempts=[attempt] * len(sel))

        latents = sampler.sample_rows(ys, ks, centroids, bases, basis_index)
        return self.sample(again, [c for c, _, _ in rows], latents)


def health_summary(manifest_path) -> dict:
    """run.json's ``health`` record from the written manifest: counts and the flagged images' paths."""
    import pyarrow.parquet as pq  # noqa: PLC0415 - only the driver needs it

    if not manifest_path.exists():
        return {"checked": 0, "flagged": 0, "regenerated": 0, "flagged_images": []}
    names = pq.read_schema(manifest_path).names
    if "flagged" not in names:  # a manifest of units written before the check
        return {"checked": 0, "flagged": 0, "regenerated": 0, "flagged_images": []}
    t = pq.read_table(manifest_path, columns=["path", "flagged", "attempt"]).to_pydict()
    flagged = [p for p, f in zip(t["path"], t["flagged"]) if f]
    return {"checked": sum(f is not None for f in t["flagged"]), "flagged": len(flagged),
            "regenerated": sum(1 for a in t["attempt"] if a), "flagged_images": flagged}
