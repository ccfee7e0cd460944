"""The real-image baselines: IPC random real training images per class, and per class the real images
nearest the MGD3 run's k-means centroids; each written as an ImageFolder like distill's output."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.common.images import crop_images, png_bytes, random_subset
from pipeline.common.outputs import atomic_write_bytes, atomic_write_json
from pipeline.config import DataConfig
from pipeline.distill.plan import read_class_latents
from pipeline.inputs.datasets import builtin_names, load_builtin
from pipeline.inputs.preprocess import decode_image
from pipeline.inputs.sources import list_source


class RealPool:
    """The training images the distill runs saw, addressed by the ids the encode stage gave them."""
    def __init__(self, data: str, size: int):
        self.size = size
        if data in builtin_names():
            images, labels, names = load_builtin(data, "train")
            self.classes = list(names)
            self.ids = {c: [] for c in names}
            for i, y in enumerate(labels):
                self.ids[names[y]].append(f"{names[y]}/{i:05d}")  # as distill's input_dataset names them
            self._pixels = lambda ids: crop_images(images[[int(i.split("/")[-1]) for i in ids]], size)
        else:
            listing = list_source(DataConfig(path=data))
            if listing.kind != "imagefolder":
                raise ValueError("real baselines need a built-in dataset or an ImageFolder")
            self.classes = listing.classes
            self.ids = {c: [] for c in listing.classes}
            for rel, cls in listing.files:
                self.ids[cls].append(rel)
            root = Path(listing.root)
            self._pixels = lambda ids: np.stack([decode_image((root / i).read_bytes(), size)[0] for i in ids])

    def pixels(self, ids: list[str]) -> np.ndarray:
        return self._pixels(ids)


def random_ids(pool: RealPool, ipc: int, seed: int) -> dict[str, list[str]]:
    """IPC random ids per class (all of a smaller class), drawn by the one seeded ``random_subset`` over
    the pool's ids, so that `demo` and `benchmark` pick the same real images for the same seed.

    This replaced the benchmark's own stream (``default_rng([seed, 17])``): random-real cells made before
    it hold other images than a rerun draws, so their accuracies differ within the seed spread."""
    ids = [i for c in pool.classes for i in pool.ids[c]]
    labels = np.repeat(np.arange(len(pool.classes)), [len(pool.ids[c]) for c in pool.classes])
    out: dict[str, list[str]] = {c: [] for c in pool.classes}
    for i in random_subset(labels, ipc, seed):
        out[pool.classes[labels[i]]].append(ids[i])
    return out


def kmeans_nearest_ids(distill_dir: Path, classes: list[str]) -> dict[str, list[str]]:
    """Per class, the real image whose latent is nearest each k-means centroid of the MGD3 run (k-means on
    the VAE latents, k = IPC, the same seed), each real image used at most once."""
    out = {}
    for c in classes:
        ids, X = read_class_latents(distill_dir / "_work" / "latents", c)
        with np.load(distill_dir / "_work" / "centroids" / f"{c}.npz") as plan:
            centroids = plan["centroids"]
        d = ((centroids[:, None, :] - X[None, :, :]) ** 2).sum(-1)
        chosen: list[int] = []
        for row in d:
            row = row.copy()
            row[chosen] = np.inf
            if np.isfinite(row).any():
                chosen.append(int(np.argmin(row)))
        out[c] = [str(ids[i]) for i in chosen]
    return out


def write_real_set(pool: RealPool, selection: dict[str, list[str]], out: Path) -> None:
    """An ImageFolder like distill's (train/<class>/<class>_<k>.png), plus the ids it holds."""
    if (out / "_SUCCESS").exists():
        return
    for c, ids in selection.items():
        for k, pixels in enumerate(pool.pixels(ids)):
            atomic_write_bytes(out / "train" / c / f"{c}_{k:04d}.png", png_bytes(pixels))
    atomic_write_json(out / "selection.json", selection)
    (out / "_SUCCESS").write_text("ok\n")
