"""Copy detection for generated images (prior samples, distilled sets), in pixels and in feature space.

The numerics are ``ops.copies``; this module fixes the two spaces so every caller reports the same thing:

- ``pixels``: uint8 RGB images at the size they were generated, as float32 in [0, 1], flattened
  (3 H W values; a distance of 1 is one pixel channel going from black to white);
- ``features``: the named feature extractor's embedding (``pipeline.eval.features``, e.g. the shipped
  mnist10k net), its name written beside the numbers.

The training images must go through the same preprocessing as the generated ones (e.g.
``prior_quality.real_images(dataset, "train", size)``), so both sit in the same space.

    refs = copy_references(train_images, extractor)   # once per training set: the leave-one-out pass
    report = copy_check(images, refs, extractor)       # per set: {"pixels": {...}, "features": {...}, ...}
"""
from __future__ import annotations

import numpy as np

from ops.copies import CopyReference, copy_report


def pixel_space(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, H W C) in [0, 1]."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def copy_references(train_images: np.ndarray, extractor=None) -> dict:
    """{"pixels": CopyReference, "features": CopyReference or None, "features_name": str or None,
    "image_shape": (H, W, C)} of uint8 training images."""
    refs = {"pixels": CopyReference.of(pixel_space(train_images)), "features": None, "features_name": None,
            "image_shape": tuple(train_images.shape[1:])}
    if extractor is not None:
        refs["features"] = CopyReference.of(extractor(train_images))
        refs["features_name"] = extractor.name
    return refs


def copy_check(images: np.ndarray, references: dict, extractor=None) -> dict:
    """``ops.copies.copy_report`` of uint8 ``images`` in pixels and (when ``references`` has them and
    ``extractor`` is the one they were made with) in features."""
    if tuple(images.shape[1:]) != references["image_shape"]:
        raise ValueError(f"images are {images.shape[1:]}, the training images {references['image_shape']}: "
                         "preprocess both to the same size")
    out = {"pixels": copy_report(pixel_space(images), references["pixels"]), "features": None,
           "features_name": None, "pixel_space": "RGB in [0, 1], flattened"}
    if references["features"] is not None and extractor is not None:
        if extractor.name != references["features_name"]:
            raise ValueError(f"features by {extractor.name!r}, references by {references['features_name']!r}")
        out["features"] = copy_report(extractor(images), references["features"])
        out["features_name"] = extractor.name
    return out


def describe(report: dict) -> list[str]:
    """One line per space, for a console."""
    lines = []
    for space in ("pixels", "features"):
        r = report.get(space)
        if r is None:
            continue
        frac = r["frac_closer_than_any_train_pair"]
        frac = "n/a (the training set holds a duplicate)" if frac is None else f"{frac:.4f}"
        lines.append(f"{space}: nearest-train distance min {r['nn']['min']:.3f} / p5 {r['nn']['p5']:.3f} / "
                     f"median {r['nn']['p50']:.3f}; real train vs train (leave-one-out) min "
                     f"{r['train_nn']['min']:.3f} / p5 {r['train_nn']['p5']:.3f} / median {r['train_nn']['p50']:.3f}; "
                     f"closer than any two train images: {frac} of {r['n']}")
    return lines
