"""Mean and spread over seeds: the one helper behind every "mean +- std (n)" the evaluation reports."""
from __future__ import annotations

import numpy as np


def mean_std(values, *, scale: float = 1.0, digits: int | None = None) -> dict:
    """Mean and population standard deviation (ddof 0, as the papers' numpy code) of the values that are
    not None, multiplied by ``scale`` (100 for percent) and rounded to ``digits`` when given.

    ``{"mean": None, "std": None, "n": 0}`` when there is no value."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64) * scale
    if v.size == 0:
        return {"mean": None, "std": None, "n": 0}
    mean, std = float(v.mean()), float(v.std())
    if digits is not None:
        mean, std = round(mean, digits), round(std, digits)
    return {"mean": mean, "std": std, "n": int(v.size)}
